"""Images from what clients send: `data:` URLs, `file://` paths under an allowed directory, or
raw bytes (gRPC). Remote http(s) URLs are refused: the gateway fetches nothing from the network.

Each image is read only as far as its header: the container format (magic bytes), its width and
height (Pillow parses the header, decodes no pixels), checked against the limits, and its SHA-256
(the encoder-affinity key). With the size, the gateway predicts the image's token count exactly
as the encoder will resize it (`common.contract.images`). Decoding happens on the encoder, which
reports an undecodable image per image.

Videos likewise: the container header only (PyAV: frame count, frame rate, size; no frame is
decoded), checked against the video limits; the encoder decodes the sampled frames.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image as PILImage

from common.contract import ImageLimits, VideoInfo, VideoLimits

# Leading bytes of the formats the encoder decodes.
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


class MediaError(ValueError):
    """A client-side problem with an image (HTTP 400, or 413 when `too_large`)."""

    def __init__(self, message: str, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


@dataclass(frozen=True, slots=True)
class Image:
    data: bytes  # the file as sent
    width: int
    height: int
    sha256: str  # lowercase hex of `data`


@dataclass(frozen=True, slots=True)
class Video:
    data: bytes  # the file as sent
    info: VideoInfo  # from its container header
    sha256: str  # lowercase hex of `data`


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sniff(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((name for magic, name in _MAGIC if data.startswith(magic)), None)


def load_image_url(url: str, allowed_dir: Path | None, limits: ImageLimits) -> Image:
    """The image behind a URL, or MediaError saying what is wrong with it."""
    if url.startswith("data:"):
        data = _data_url(url)
    elif url.startswith("file://"):
        data = _file_url(url, allowed_dir, limits.max_image_bytes)
    elif url.startswith(("http://", "https://")):
        raise MediaError("remote image URLs are not fetched; send a data: URL instead")
    else:
        raise MediaError(f"unsupported image URL scheme in {url[:32]!r}")
    return read_image(data, limits)


def load_video_url(url: str, allowed_dir: Path | None, limits: VideoLimits) -> Video:
    """The video behind a URL, or MediaError saying what is wrong with it."""
    if url.startswith("data:"):
        data = _data_url(url, "video")
    elif url.startswith("file://"):
        data = _file_url(url, allowed_dir, limits.max_video_bytes, "video")
    elif url.startswith(("http://", "https://")):
        raise MediaError("remote video URLs are not fetched; send a data: URL instead")
    else:
        raise MediaError(f"unsupported video URL scheme in {url[:32]!r}")
    return read_video(data, limits)


def read_video(data: bytes, limits: VideoLimits) -> Video:
    """Check a video file's size and container header against the limits (no frame decoded)."""
    if not data:
        raise MediaError("video is empty")
    if len(data) > limits.max_video_bytes:
        raise MediaError(f"video is {len(data)} bytes, over the limit of {limits.max_video_bytes} "
                         "(--max-video-bytes)", True)  # fmt: skip
    # PyAV (FFmpeg) on first use: a gateway that never sees a video does not load it (24 MiB of
    # RSS, ~0.1 s of start-up).
    from common.video_io import probe

    try:
        info = probe(data)
        limits.check(info)
    except ValueError as e:  # the decoder's reason, or the limit exceeded
        raise MediaError(str(e)) from None
    return Video(data, info, content_hash(data))


def read_image(data: bytes, limits: ImageLimits) -> Image:
    """Check an image file's size, format and header against the limits."""
    if not data:
        raise MediaError("image is empty")
    if len(data) > limits.max_image_bytes:
        raise MediaError(
            f"image is {len(data)} bytes, over the limit of {limits.max_image_bytes}", True
        )
    if sniff(data) is None:
        raise MediaError("image data is not a PNG, JPEG, WebP, GIF, BMP or TIFF file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
            with PILImage.open(io.BytesIO(data)) as img:  # header only: no pixels decoded
                width, height = img.size
    except PILImage.DecompressionBombError as e:
        raise MediaError(f"image too large to decode safely: {e}", True) from None
    except Exception as e:  # Pillow raises many types for a corrupt header
        raise MediaError(f"cannot read the image header: {type(e).__name__}: {e}") from None
    if width <= 0 or height <= 0:
        raise MediaError(f"image has zero size ({width}x{height})")
    if width * height > limits.max_image_pixels:
        raise MediaError(
            f"image has {width}x{height} = {width * height} pixels, over the limit "
            f"{limits.max_image_pixels}",
            True,
        )
    return Image(data, width, height, content_hash(data))


def _data_url(url: str, kind: str = "image") -> bytes:
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise MediaError("malformed data URL (no comma)")
    mime = header.split(";")[0].strip().lower()
    if mime and not mime.startswith(f"{kind}/"):
        article = "an" if kind == "image" else "a"
        raise MediaError(f"data URL has media type {mime!r}, not {article} {kind}")
    if ";base64" not in header.lower():
        try:
            return unquote(payload, errors="strict").encode("latin-1")
        except (UnicodeError, ValueError) as e:
            raise MediaError(f"data URL is not valid percent-encoded bytes: {e}") from None
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"data URL is not valid base64: {e}") from e


def _file_url(url: str, allowed_dir: Path | None, max_bytes: int, kind: str = "image") -> bytes:
    if allowed_dir is None:
        raise MediaError(
            f"file:// {kind} URLs are disabled (start the gateway with --allowed-local-media-path)"
        )
    try:
        path = Path(unquote(urlparse(url).path)).resolve()
        if not path.is_relative_to(allowed_dir.resolve()):
            raise MediaError(f"file {path} is outside the allowed directory")
        if not path.is_file():
            raise MediaError(f"file {path} does not exist")
        size = path.stat().st_size
        if size > max_bytes:
            raise MediaError(f"{kind} is {size} bytes, over the limit of {max_bytes}", True)
        return path.read_bytes()
    except (ValueError, OSError) as e:  # a NUL byte, a name too long, unreadable, ...
        if isinstance(e, MediaError):
            raise
        raise MediaError(f"cannot read the file URL: {type(e).__name__}: {e}") from None
