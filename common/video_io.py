"""Video files through PyAV (FFmpeg): the container header, and the sampled frames as RGB.

`probe` reads what the planning needs (`common.contract.videos.VideoInfo`) from the first video
stream, as transformers' PyAV loader does: the frame count the container states and the stream's
average frame rate. A container that states no count (WebM, Matroska) is counted by demuxing its
packets, which decodes nothing.

`decode_frames` returns exactly the frames transformers' loader returns for the same indices (it
decodes every frame up to the last sampled one, each converted to `rgb24`), but seeks: the
packets' presentation times, read by demuxing, name frame i (the i-th in presentation order, as
the decoder emits them); for each sampled frame past the next keyframe the decoder jumps to the
keyframe before it instead of decoding everything in between. Decoding is deterministic, so the
frames are bit-identical to a full decode (tested); a stream whose packets lack timestamps is
decoded from the start.

Torch-free: the gateway probes headers with it, the encoder decodes. Every FFmpeg failure becomes
a `ValueError` carrying the decoder's reason.
"""

from __future__ import annotations

import bisect
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import av
import numpy as np

from common.contract.videos import VideoInfo

# Leading bytes of the containers the decoder is asked to open (ISO BMFF / QuickTime, Matroska /
# WebM, AVI); anything else is refused before FFmpeg sees it.
_EBML = b"\x1a\x45\xdf\xa3"


def sniff_video(data: bytes) -> str | None:
    if data[4:8] == b"ftyp" or data[4:8] in (b"moov", b"mdat", b"free", b"wide"):
        return "mp4"
    if data.startswith(_EBML):
        return "matroska"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    return None


def probe(data: bytes) -> VideoInfo:
    """The first video stream's frame count, frame rate and size; ValueError with the reason."""
    with _open(data) as container:
        stream = _video_stream(container)
        total = int(stream.frames)
        if total <= 0:  # not stated in the header: count the packets (no decoding)
            total = sum(1 for p in _demux(container, stream) if p.size)
        rate = stream.average_rate
        fps = float(rate) if rate else 0.0
        width, height = int(stream.codec_context.width), int(stream.codec_context.height)
    if total <= 0:
        raise ValueError("the video has no frames")
    if width <= 0 or height <= 0:
        raise ValueError(f"video has zero size ({width}x{height})")
    return VideoInfo(total, fps, width, height)


@dataclass(frozen=True, slots=True)
class DecodedFrames:
    frames: np.ndarray  # [n, H, W, 3] uint8, one per requested index, in request order
    decoded: int  # frames the decoder produced to get them (seeking skips the rest)


def decode_frames(data: bytes, indices: Sequence[int]) -> DecodedFrames:
    """The frames at `indices` (repeats allowed) as RGB; ValueError with the decoder's reason."""
    if not indices:
        raise ValueError("no frames to decode")
    wanted = sorted(set(indices))
    with _open(data) as container:
        stream = _video_stream(container)
        stream.thread_type = "AUTO"  # frame threads: the same frames, decoded faster
        times, keyframes = _frame_times(container, stream)
        if times is not None and wanted[-1] >= len(times):
            raise ValueError(
                f"the video has {len(times)} frames; frame {wanted[-1]} was to be decoded "
                "(is the file truncated?)"
            )
        try:
            if times is None:
                got, decoded = _decode_in_order(container, stream, wanted)
            else:
                got, decoded = _decode_seeking(container, stream, wanted, times, keyframes)
        except av.error.FFmpegError as e:
            raise ValueError(f"cannot decode the video: {_reason(e)}") from None
    return DecodedFrames(np.stack([got[i] for i in indices]), decoded)


def _frame_times(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> tuple[list[int] | None, list[int]]:
    """Presentation times of every frame in order, and those of the keyframes (stream time
    base); None when a packet has no timestamp (then nothing can be sought)."""
    times: list[int] = []
    keyframes: list[int] = []
    for packet in _demux(container, stream):
        if not packet.size:
            continue
        if packet.pts is None:
            return None, []
        times.append(packet.pts)
        if packet.is_keyframe:
            keyframes.append(packet.pts)
    times.sort()
    keyframes.sort()
    return times, keyframes


def _decode_seeking(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    wanted: list[int],
    times: list[int],
    keyframes: list[int],
) -> tuple[dict[int, np.ndarray], int]:
    got: dict[int, np.ndarray] = {}
    decoded = 0
    frames: Iterator[av.VideoFrame] | None = None
    position: int | None = None  # pts of the last frame decoded
    for index in wanted:
        target = times[index]
        k = bisect.bisect_right(keyframes, target) - 1
        keyframe = keyframes[k] if k >= 0 else times[0]
        if frames is None or position is None or keyframe > position:
            container.seek(keyframe, stream=stream, backward=True, any_frame=False)
            frames = container.decode(stream)
        for frame in frames:
            decoded += 1
            if frame.pts is None or frame.pts > target:
                # The decoder went past the frame (a damaged index): do it the slow, sure way.
                return _decode_in_order(container, stream, wanted)
            if frame.pts == target:
                got[index] = frame.to_ndarray(format="rgb24")
                position = target
                break
        else:
            raise ValueError(f"the video ended before frame {index}")
    return got, decoded


def _decode_in_order(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, wanted: list[int]
) -> tuple[dict[int, np.ndarray], int]:
    """Every frame from the start up to the last wanted one (transformers' loader)."""
    container.seek(0)
    keep = set(wanted)
    got: dict[int, np.ndarray] = {}
    decoded = 0
    for i, frame in enumerate(container.decode(stream)):
        decoded += 1
        if i in keep:
            got[i] = frame.to_ndarray(format="rgb24")
        if i >= wanted[-1]:
            break
    missing = [i for i in wanted if i not in got]
    if missing:
        raise ValueError(f"the video has {decoded} decodable frames; frame {missing[0]} is missing")
    return got, decoded


def _open(data: bytes) -> av.container.InputContainer:
    if not data:
        raise ValueError("video is empty")
    if sniff_video(data) is None:
        raise ValueError("video data is not an MP4/MOV, WebM/MKV or AVI file")
    try:
        return av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except av.error.EOFError as e:
        reason = f"it ends before any frame ({_reason(e)})"
        raise ValueError(f"cannot read the video: {reason}") from None
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot read the video: {_reason(e)}") from None


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        only = f"{', '.join(kinds)} streams only" if kinds else "no streams at all"
        raise ValueError(f"the file has no video stream ({only})")
    return container.streams.video[0]


def _demux(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> Iterator[av.Packet]:
    try:
        yield from container.demux(stream)
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot read the video: {_reason(e)}") from None


def _reason(e: av.error.FFmpegError) -> str:
    return f"{type(e).__name__}: {e.strerror or e}"
