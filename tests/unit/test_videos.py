"""Video planning (the contract's arithmetic) against transformers' Qwen3-VL video processor, and
PyAV decoding: seeking gives exactly the frames of a full decode."""

from __future__ import annotations

import random

import numpy as np
import pytest

from common.contract import ContractError, VideoInfo, VideoLimits, VideoPreprocessConfig
from common.contract.videos import (
    chunk_patches,
    expand_video_placeholders,
    patch_timestamps,
    plan_video,
    sample_indices,
    video_smart_resize,
)
from common.video_io import _decode_in_order, _open, _video_stream, decode_frames, probe


def hf_video_processor(**kw):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    return Qwen3VLVideoProcessor(**kw)


def test_frame_sampling_matches_transformers():
    from transformers.video_utils import VideoMetadata

    rng = random.Random(0)
    cfg = VideoPreprocessConfig()
    for _ in range(300):
        total, fps = rng.randint(1, 3000), rng.choice([5.0, 10.0, 23.976, 24.0, 29.97, 30.0, 60.0])
        want_fps, max_frames = rng.choice([0.5, 1.0, 2.0, 3.3, 8.0]), rng.randint(2, 768)
        vp = hf_video_processor(max_frames=max_frames)
        meta = VideoMetadata(total_num_frames=total, fps=fps)
        ref = vp.sample_frames(meta, fps=want_fps).tolist()
        ours = sample_indices(VideoInfo(total, fps, 64, 64), cfg.sampling(want_fps, max_frames), 4)
        assert ours == ref, (total, fps, want_fps, max_frames)


def test_resize_budget_across_frames_matches_transformers():
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

    rng = random.Random(1)
    for _ in range(500):
        cfg = VideoPreprocessConfig(
            min_pixels=rng.choice([4096, 131072]),
            max_pixels=rng.choice([65536, 262144, 786432, 25165824]),
        )
        frames, h, w = rng.randint(2, 64), rng.randint(8, 2000), rng.randint(8, 2000)
        if max(h, w) / min(h, w) > 190:
            continue
        ref = smart_resize(
            frames,
            h,
            w,
            temporal_factor=2,
            factor=32,
            min_pixels=cfg.min_pixels,
            max_pixels=cfg.max_pixels,
        )
        assert video_smart_resize(frames, h, w, cfg) == ref, (frames, h, w, cfg)


def test_timestamps_match_the_processor():
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    for indices, fps in (([0, 5, 10, 15], 10.0), ([0, 4, 8, 12, 17], 9.0), ([0, 3, 7], 23.976)):
        ref = Qwen3VLProcessor._calculate_timestamps(None, np.array(indices), fps, 2)
        assert patch_timestamps(indices, fps, 2) == ref


def test_plan_of_a_short_video():
    plan = plan_video(
        VideoInfo(45, 10.0, 80, 64),
        VideoPreprocessConfig().sampling(),
        VideoPreprocessConfig(min_pixels=4096, max_pixels=262144),
    )
    assert plan.indices == (0, 6, 11, 16, 22, 28, 33, 38, 44)  # 9 frames: int(4.5 * 2)
    assert plan.grid == (5, 4, 4) and (plan.height, plan.width) == (64, 64)  # 2.5 -> 2
    assert plan.frames_of(4, 1, 2) == (44, 44)  # the last patch repeats the last frame
    assert len(plan.timestamps) == 5 and plan.timestamps[-1] == pytest.approx(4.4)


def test_one_frame_is_refused_as_transformers_refuses_it():
    with pytest.raises(ValueError, match="at least 2"):
        plan_video(
            VideoInfo(1, 10.0, 64, 64), VideoPreprocessConfig().sampling(), VideoPreprocessConfig()
        )


def test_request_sampling_stays_within_the_server_limits():
    cfg = VideoPreprocessConfig(max_frames=32)
    assert cfg.sampling(4.0, 8).max_frames == 8
    for fps, max_frames in ((0.0, None), (120.0, None), (None, 64), (None, 1)):
        with pytest.raises(ContractError) as e:
            cfg.sampling(fps, max_frames)
        assert e.value.param == "mm_processor_kwargs"


def test_placeholders_and_chunks():
    text = "a<|vision_start|><|video_pad|><|vision_end|>b"
    out = expand_video_placeholders(text, [[0.25, 1.25]])
    assert out == (
        "a<|vision_start|><0.2 seconds><|vision_start|><|video_pad|><|vision_end|>"
        "<1.2 seconds><|vision_start|><|video_pad|><|vision_end|><|vision_end|>b"
    )
    with pytest.raises(ContractError, match="1 video placeholder"):
        expand_video_placeholders(text, [[0.0], [1.0]])
    assert chunk_patches((12, 4, 4), 100) == [(0, 6), (6, 6)]
    assert chunk_patches((5, 8, 8), 10) == [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1)]


def test_limits_name_themselves():
    limits = VideoLimits(max_video_seconds=10, max_video_frames=200)
    with pytest.raises(ValueError, match="--max-video-frames"):
        limits.check(VideoInfo(300, 60.0, 64, 64))
    with pytest.raises(ValueError, match="--max-video-seconds"):
        limits.check(VideoInfo(150, 10.0, 64, 64))


CODECS = [
    ("libx264", "mp4", {"g": "8", "bf": "2"}),
    ("libx265", "mp4", None),
    ("libvpx-vp9", "webm", None),
    ("libsvtav1", "matroska", None),
    ("mpeg4", "avi", {"g": "5"}),
]


@pytest.mark.parametrize(("codec", "container", "options"), CODECS)
def test_seeking_decodes_exactly_the_frames_of_a_full_decode(video, codec, container, options):
    data = video(64, 48, 45, 10, 1, codec, container, options)
    info = probe(data)
    assert (info.total_frames, info.fps, info.width, info.height) == (45, 10.0, 64, 48)
    indices = [0, 3, 9, 17, 18, 30, 44, 44]
    got = decode_frames(data, indices)
    with _open(data) as c:
        full, n = _decode_in_order(c, _video_stream(c), sorted(set(indices)))
    assert n == 45
    assert np.array_equal(got.frames, np.stack([full[i] for i in indices]))
    if codec in ("libx264", "mpeg4"):  # keyframes every few frames: seeking skips decoding
        assert got.decoded < 30


def test_frames_match_transformers_pyav_loader(video, tmp_path):
    from transformers.video_utils import read_video_pyav

    data = video(64, 48, 30, 10, 2, "libx264", "mp4", {"g": "6", "bf": "2"})
    (tmp_path / "v.mp4").write_bytes(data)
    indices = [0, 7, 14, 22, 29]
    ref, meta = read_video_pyav(str(tmp_path / "v.mp4"), lambda metadata, **_: np.array(indices))
    assert np.array_equal(decode_frames(data, indices).frames, ref)
    assert (meta.total_num_frames, meta.fps) == (30, 10.0)


def test_bad_files_say_why():
    from bench.media import synthetic_audio, synthetic_video

    good = synthetic_video(64, 48, 20)
    cases = [
        (b"hello", "not an MP4"),
        (good[:300], "cannot read the video"),
        (synthetic_audio(), "no video stream (audio streams only)"),
        (synthetic_video(64, 48, 0, codec="mpeg4", container="avi"), "no frames"),
    ]
    for data, reason in cases:
        with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(")", r"\)")):
            probe(data)
    with pytest.raises(ValueError, match="has 20 frames; frame 25"):
        decode_frames(good, [0, 25])
