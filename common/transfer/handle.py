"""Checks a consumer makes on a TensorHandle before and after a transfer."""

from __future__ import annotations

import math
import time

import torch

from common.rpc import tensor_pb2
from common.transfer import dtypes, header
from common.transfer.errors import TensorExpiredError, TensorNotFoundError, TensorSpecError


def spec_of(handle: tensor_pb2.TensorHandle) -> tuple[torch.dtype, tuple[int, ...]]:
    """(dtype, shape) of a well-formed handle; TensorSpecError if its fields disagree."""
    dtype = dtypes.from_proto(handle.dtype)
    shape = tuple(handle.shape)
    if any(d < 0 for d in shape):
        raise TensorSpecError(f"handle {handle.id}: negative dimension in shape {shape}")
    expected = math.prod(shape) * dtype.itemsize
    if handle.nbytes != expected:
        raise TensorSpecError(
            f"handle {handle.id}: nbytes {handle.nbytes} != {expected} for {dtype} {list(shape)}"
        )
    if handle.WhichOneof("location") is None:
        raise TensorSpecError(f"handle {handle.id} has no location")
    return dtype, shape


def producer_of(handle: tensor_pb2.TensorHandle) -> str:
    """Where a handle's bytes are, for errors and logs: the TensorStore address, the NIXL agent,
    or the shared-memory segment and host."""
    kind = handle.WhichOneof("location")
    if kind == "grpc":
        return handle.grpc.address
    if kind == "nixl":
        return f"nixl agent {handle.nixl.agent_name}"
    if kind == "shm":
        return f"shm {handle.shm.segment} on {handle.shm.host_id}"
    return "unknown"


def expired(handle: tensor_pb2.TensorHandle) -> bool:
    return time.time() * 1000 >= handle.expiry_unix_ms


def check_not_expired(handle: tensor_pb2.TensorHandle) -> None:
    if expired(handle):
        raise TensorExpiredError(
            f"handle {handle.id} expired {time.time() - handle.expiry_unix_ms / 1000:.3f} s ago; "
            "the producer may have reused its memory (fetch sooner, or raise lease_s)"
        )


def check_header(handle: tensor_pb2.TensorHandle, raw: bytes) -> None:
    """Given the slot header re-read after the copy, raise unless the data copied is ours."""
    tensor_id, state = header.decode(raw)
    if tensor_id == handle.id and state == header.STATE_LIVE:
        return
    if tensor_id == handle.id and state == header.STATE_ACKED:
        raise TensorNotFoundError(f"tensor {handle.id} was already fetched and acknowledged")
    check_not_expired(handle)
    raise TensorNotFoundError(f"tensor {handle.id} is unknown or already released")


def prepare_out(
    handle: tensor_pb2.TensorHandle, out: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tensor to return, its bytes as a flat uint8 view): `out` checked, or a new CPU tensor."""
    dtype, shape = spec_of(handle)
    if out is None:
        out = torch.empty(shape, dtype=dtype)
    elif out.dtype != dtype or tuple(out.shape) != shape or not out.is_contiguous():
        raise TensorSpecError(
            f"out buffer is {out.dtype} {list(out.shape)} (contiguous={out.is_contiguous()}), "
            f"handle {handle.id} holds {dtype} {list(shape)}"
        )
    return out, out.reshape(-1).view(torch.uint8)  # [nbytes]
