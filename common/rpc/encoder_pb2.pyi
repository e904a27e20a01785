from common.rpc import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodeRequest(_message.Message):
    __slots__ = ("images", "consumer_host")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_HOST_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageData]
    consumer_host: str
    def __init__(self, images: _Optional[_Iterable[_Union[ImageData, _Mapping]]] = ..., consumer_host: _Optional[str] = ...) -> None: ...

class ImageData(_message.Message):
    __slots__ = ("data", "content_hash")
    DATA_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    content_hash: str
    def __init__(self, data: _Optional[bytes] = ..., content_hash: _Optional[str] = ...) -> None: ...

class EncodeReply(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[EncodedImage]
    def __init__(self, images: _Optional[_Iterable[_Union[EncodedImage, _Mapping]]] = ...) -> None: ...

class EncodedImage(_message.Message):
    __slots__ = ("handle", "grid_thw", "n_tokens", "image_hash", "cache_hit", "preprocess_seconds", "encode_seconds")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    GRID_THW_FIELD_NUMBER: _ClassVar[int]
    N_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HASH_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    handle: _tensor_pb2.TensorHandle
    grid_thw: GridTHW
    n_tokens: int
    image_hash: str
    cache_hit: bool
    preprocess_seconds: float
    encode_seconds: float
    def __init__(self, handle: _Optional[_Union[_tensor_pb2.TensorHandle, _Mapping]] = ..., grid_thw: _Optional[_Union[GridTHW, _Mapping]] = ..., n_tokens: _Optional[int] = ..., image_hash: _Optional[str] = ..., cache_hit: _Optional[bool] = ..., preprocess_seconds: _Optional[float] = ..., encode_seconds: _Optional[float] = ...) -> None: ...

class GridTHW(_message.Message):
    __slots__ = ("t", "h", "w")
    T_FIELD_NUMBER: _ClassVar[int]
    H_FIELD_NUMBER: _ClassVar[int]
    W_FIELD_NUMBER: _ClassVar[int]
    t: int
    h: int
    w: int
    def __init__(self, t: _Optional[int] = ..., h: _Optional[int] = ..., w: _Optional[int] = ...) -> None: ...
