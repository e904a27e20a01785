"""Tensor transfer between processes: a producer publishes, a consumer fetches by handle.

    producer = Producer(TransferConfig(backend="shm"))      # pool preallocated once
    handle = producer.publish(tensor)                       # TensorHandle (tensor.proto)
    ...send the handle to the consumer inside any RPC...
    tensor = Consumer().fetch(handle, out=buf, deadline=d)  # copy, then acknowledge

Backends (backends/): shm (same host), nixl (NIXL/UCX one-sided READ), grpc (TensorStore
stream). The producer's config picks where tensors are published; the consumer reads whatever
location a handle names. Failures raise TransferError subclasses (errors.py).
"""

from common.transfer.config import TransferConfig
from common.transfer.consumer import Consumer
from common.transfer.errors import (
    BackendUnavailableError,
    ChecksumMismatchError,
    PoolExhaustedError,
    ProducerLostError,
    TensorExpiredError,
    TensorNotFoundError,
    TensorSpecError,
    TransferError,
    TransferTimeoutError,
    WrongHostError,
)
from common.transfer.host import host_id
from common.transfer.producer import Producer

__all__ = [
    "BackendUnavailableError",
    "ChecksumMismatchError",
    "Consumer",
    "PoolExhaustedError",
    "Producer",
    "ProducerLostError",
    "TensorExpiredError",
    "TensorNotFoundError",
    "TensorSpecError",
    "TransferConfig",
    "TransferError",
    "TransferTimeoutError",
    "WrongHostError",
    "host_id",
]
