from common.rpc import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodeRequest(_message.Message):
    __slots__ = ("images", "consumer_host", "videos")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_HOST_FIELD_NUMBER: _ClassVar[int]
    VIDEOS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageData]
    consumer_host: str
    videos: _containers.RepeatedCompositeFieldContainer[VideoData]
    def __init__(self, images: _Optional[_Iterable[_Union[ImageData, _Mapping]]] = ..., consumer_host: _Optional[str] = ..., videos: _Optional[_Iterable[_Union[VideoData, _Mapping]]] = ...) -> None: ...

class VideoData(_message.Message):
    __slots__ = ("data", "content_hash", "fps", "max_frames", "first_patch", "num_patches")
    DATA_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FIRST_PATCH_FIELD_NUMBER: _ClassVar[int]
    NUM_PATCHES_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    content_hash: str
    fps: float
    max_frames: int
    first_patch: int
    num_patches: int
    def __init__(self, data: _Optional[bytes] = ..., content_hash: _Optional[str] = ..., fps: _Optional[float] = ..., max_frames: _Optional[int] = ..., first_patch: _Optional[int] = ..., num_patches: _Optional[int] = ...) -> None: ...

class ImageData(_message.Message):
    __slots__ = ("data", "content_hash")
    DATA_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    content_hash: str
    def __init__(self, data: _Optional[bytes] = ..., content_hash: _Optional[str] = ...) -> None: ...

class EncodeReply(_message.Message):
    __slots__ = ("images", "videos")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    VIDEOS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[EncodedImage]
    videos: _containers.RepeatedCompositeFieldContainer[EncodedVideo]
    def __init__(self, images: _Optional[_Iterable[_Union[EncodedImage, _Mapping]]] = ..., videos: _Optional[_Iterable[_Union[EncodedVideo, _Mapping]]] = ...) -> None: ...

class EncodedVideo(_message.Message):
    __slots__ = ("handle", "grid_thw", "n_tokens", "video_hash", "cache_hit", "timestamps", "first_patch", "total_patches", "frames_decoded", "preprocess_seconds", "encode_seconds")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    GRID_THW_FIELD_NUMBER: _ClassVar[int]
    N_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VIDEO_HASH_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    FIRST_PATCH_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PATCHES_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DECODED_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    handle: _tensor_pb2.TensorHandle
    grid_thw: GridTHW
    n_tokens: int
    video_hash: str
    cache_hit: bool
    timestamps: _containers.RepeatedScalarFieldContainer[float]
    first_patch: int
    total_patches: int
    frames_decoded: int
    preprocess_seconds: float
    encode_seconds: float
    def __init__(self, handle: _Optional[_Union[_tensor_pb2.TensorHandle, _Mapping]] = ..., grid_thw: _Optional[_Union[GridTHW, _Mapping]] = ..., n_tokens: _Optional[int] = ..., video_hash: _Optional[str] = ..., cache_hit: _Optional[bool] = ..., timestamps: _Optional[_Iterable[float]] = ..., first_patch: _Optional[int] = ..., total_patches: _Optional[int] = ..., frames_decoded: _Optional[int] = ..., preprocess_seconds: _Optional[float] = ..., encode_seconds: _Optional[float] = ...) -> None: ...

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
