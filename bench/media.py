"""Synthetic media for benchmarks and tests, made locally: nothing is downloaded."""

from __future__ import annotations

import io

import av
import numpy as np


def synthetic_video(
    width: int,
    height: int,
    frames: int,
    fps: int = 10,
    seed: int = 0,
    codec: str = "libx264",
    container: str = "mp4",
    options: dict[str, str] | None = None,
) -> bytes:
    """A video of moving gradients plus noise (every frame differs), encoded with PyAV's FFmpeg.

    `codec`: libx264 / libx265 / libvpx-vp9 / libsvtav1 / mpeg4 / ffv1, ...; `container`: mp4,
    webm, matroska, avi. `options` go to the encoder (e.g. {"g": "8", "bf": "2"}: a keyframe
    every 8 frames, B-frames)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        assert isinstance(stream, av.video.stream.VideoStream)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p" if codec != "ffv1" else "yuv444p"
        if options:
            opts: dict[str, object] = dict(options)
            stream.options = opts
        out.start_encoding()  # writes the header even when there are no frames
        ys, xs = np.mgrid[0:height, 0:width]
        for i in range(frames):
            base = np.stack(
                [(xs * 4 + i * 9) % 256, (ys * 4 + i * 5) % 256, (xs + ys + i * 13) % 256], axis=-1
            )
            noise = rng.integers(-24, 25, size=base.shape)
            arr = np.clip(base + noise, 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def synthetic_audio(seconds: float = 1.0, rate: int = 16000, container: str = "mp4") -> bytes:
    """An audio-only file (AAC tone): a container with no video stream."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream("aac", rate=rate)
        assert isinstance(stream, av.audio.stream.AudioStream)
        n = int(seconds * rate)
        t = np.arange(n) / rate
        samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
        for start in range(0, n, 1024):
            frame = av.AudioFrame.from_ndarray(
                samples[:, start : start + 1024], format="fltp", layout="mono"
            )
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()
