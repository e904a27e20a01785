"""Image bytes from what clients send: `data:` URLs, `file://` paths under an allowed directory,
or raw bytes (gRPC). Remote http(s) URLs are refused: the gateway fetches nothing from the network.

Only the container format is checked here (magic bytes); decoding happens on the encoder, which
reports undecodable images per image.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from pathlib import Path
from urllib.parse import unquote, urlparse

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
    """A client-side problem with an image reference (HTTP 400)."""


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sniff(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((name for magic, name in _MAGIC if data.startswith(magic)), None)


def load_image_url(url: str, allowed_dir: Path | None, max_bytes: int) -> bytes:
    """The bytes behind an image URL, or MediaError saying what is wrong with it."""
    if url.startswith("data:"):
        data = _data_url(url)
    elif url.startswith("file://"):
        data = _file_url(url, allowed_dir, max_bytes)
    elif url.startswith(("http://", "https://")):
        raise MediaError("remote image URLs are not fetched; send a data: URL instead")
    else:
        raise MediaError(f"unsupported image URL scheme in {url[:32]!r}")
    return check_image_bytes(data, max_bytes)


def check_image_bytes(data: bytes, max_bytes: int) -> bytes:
    if not data:
        raise MediaError("image is empty")
    if len(data) > max_bytes:
        raise MediaError(f"image is {len(data)} bytes, over the limit of {max_bytes}")
    if sniff(data) is None:
        raise MediaError("image data is not a PNG, JPEG, WebP, GIF, BMP or TIFF file")
    return data


def _data_url(url: str) -> bytes:
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise MediaError("malformed data URL (no comma)")
    mime = header.split(";")[0].strip().lower()
    if mime and not mime.startswith("image/"):
        raise MediaError(f"data URL has media type {mime!r}, not an image")
    if ";base64" not in header.lower():
        return unquote(payload).encode("latin-1")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"data URL is not valid base64: {e}") from e


def _file_url(url: str, allowed_dir: Path | None, max_bytes: int) -> bytes:
    if allowed_dir is None:
        raise MediaError(
            "file:// image URLs are disabled (start the gateway with --allowed-local-media-path)"
        )
    path = Path(unquote(urlparse(url).path)).resolve()
    root = allowed_dir.resolve()
    if not path.is_relative_to(root):
        raise MediaError(f"file {path} is outside the allowed directory")
    if not path.is_file():
        raise MediaError(f"file {path} does not exist")
    if path.stat().st_size > max_bytes:
        raise MediaError(f"image is {path.stat().st_size} bytes, over the limit of {max_bytes}")
    return path.read_bytes()
