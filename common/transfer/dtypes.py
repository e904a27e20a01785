"""torch dtype <-> `tensor.proto` DType, the only element types a handle may carry."""

from __future__ import annotations

import torch

from common.rpc import tensor_pb2
from common.transfer.errors import TensorSpecError

_TO_PROTO: dict[torch.dtype, tensor_pb2.DType] = {
    torch.float32: tensor_pb2.DTYPE_FLOAT32,
    torch.float16: tensor_pb2.DTYPE_FLOAT16,
    torch.bfloat16: tensor_pb2.DTYPE_BFLOAT16,
    torch.float64: tensor_pb2.DTYPE_FLOAT64,
    torch.int8: tensor_pb2.DTYPE_INT8,
    torch.uint8: tensor_pb2.DTYPE_UINT8,
    torch.int16: tensor_pb2.DTYPE_INT16,
    torch.int32: tensor_pb2.DTYPE_INT32,
    torch.int64: tensor_pb2.DTYPE_INT64,
    torch.bool: tensor_pb2.DTYPE_BOOL,
}
_FROM_PROTO: dict[int, torch.dtype] = {v: k for k, v in _TO_PROTO.items()}


def to_proto(dtype: torch.dtype) -> tensor_pb2.DType:
    if dtype not in _TO_PROTO:
        raise TensorSpecError(f"dtype {dtype} cannot be transferred; supported: {list(_TO_PROTO)}")
    return _TO_PROTO[dtype]


def from_proto(value: int) -> torch.dtype:
    if value not in _FROM_PROTO:
        raise TensorSpecError(f"handle has unknown dtype enum value {value}")
    return _FROM_PROTO[value]
