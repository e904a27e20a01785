"""Consumer side: fetch a tensor by handle into local memory, then acknowledge it.

`fetch` is synchronous and thread-safe; asyncio callers use `fetch_async`, which runs it in a
worker thread so the event loop never blocks on a copy. Every fetch has a deadline; when it
passes, the in-flight transfer is aborted before `fetch` raises, so `out` can be reused at once.
"""

from __future__ import annotations

import asyncio
import threading
import time
import zlib

import torch

from common.rpc import tensor_pb2
from common.transfer import backends, metrics
from common.transfer.backends.base import Reader
from common.transfer.config import TransferConfig
from common.transfer.errors import ChecksumMismatchError, TensorSpecError, TransferError
from common.transfer.handle import check_not_expired, prepare_out


class Consumer:
    """Reads any location a handle names; one Reader per backend, created on first use."""

    def __init__(self, config: TransferConfig | None = None) -> None:
        self.config = config or TransferConfig()
        self._readers: dict[str, Reader] = {}
        self._lock = threading.Lock()

    def fetch(
        self,
        handle: tensor_pb2.TensorHandle,
        out: torch.Tensor | None = None,
        deadline: float | None = None,
    ) -> torch.Tensor:
        """The handle's tensor, in `out` (checked against the handle) or a new CPU tensor.

        `deadline` is a `time.monotonic()` instant (default: now + config.fetch_timeout_s).
        Raises a TransferError subclass naming the cause: TransferTimeoutError,
        ProducerLostError, TensorExpiredError, TensorNotFoundError (unknown, released or
        already fetched), WrongHostError, TensorSpecError, ChecksumMismatchError.
        """
        start = time.monotonic()
        deadline = start + self.config.fetch_timeout_s if deadline is None else deadline
        kind = handle.WhichOneof("location") or "none"
        try:
            result, flat = prepare_out(handle, out)
            check_not_expired(handle)
            reader = self._reader(kind)
            reader.read(handle, flat, deadline, reused=out is not None)
            if handle.HasField("crc32"):
                crc = zlib.crc32(flat.cpu().numpy().data)
                if crc != handle.crc32:
                    # Not acknowledged: a retry within the lease may still succeed.
                    raise ChecksumMismatchError(
                        f"tensor {handle.id}: CRC-32 {crc:#010x}, handle says {handle.crc32:#010x}"
                    )
            reader.acknowledge(handle, deadline)
        except TransferError as e:
            metrics.FAILURES.labels(kind, "consumer", e.reason).inc()
            raise
        metrics.FETCH_SECONDS.labels(kind).observe(time.monotonic() - start)
        metrics.TRANSFERS.labels(kind, "consumer").inc()
        metrics.TRANSFER_BYTES.labels(kind, "consumer").inc(handle.nbytes)
        return result

    async def fetch_async(
        self,
        handle: tensor_pb2.TensorHandle,
        out: torch.Tensor | None = None,
        deadline: float | None = None,
    ) -> torch.Tensor:
        """`fetch` in a worker thread. Cancelling the awaiting task does not stop the copy early;
        the deadline does."""
        return await asyncio.to_thread(self.fetch, handle, out, deadline)

    def close(self) -> None:
        with self._lock:
            for reader in self._readers.values():
                reader.close()
            self._readers.clear()

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _reader(self, kind: str) -> Reader:
        with self._lock:
            if kind not in self._readers:
                if kind not in backends.BACKENDS:
                    raise TensorSpecError(f"handle has no known location ({kind})")
                self._readers[kind] = backends.load(kind).Reader(self.config)
            return self._readers[kind]
