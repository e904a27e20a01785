"""`epd encoder`'s batch defaults follow the device: no wait on CPU, where a forward costs
nearly the sum of its images, a short wait on CUDA; an explicit flag wins on both."""

from __future__ import annotations

import argparse

import pytest

from services.encoder.__main__ import (
    CPU_BATCH_IMAGES,
    CPU_MAX_WAIT_MS,
    add_arguments,
    config_from_args,
)
from services.encoder.encoder import EncoderConfig


def _config(*argv: str) -> EncoderConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(["--model", "m", *argv])).encoder


@pytest.mark.parametrize(
    ("argv", "images"),
    [
        ((), CPU_BATCH_IMAGES),
        (("--device", "cuda"), EncoderConfig.max_batch_images),
        (("--device", "cuda:1"), EncoderConfig.max_batch_images),
        (("--max-batch-images", "16"), 16),
        (("--device", "cuda", "--max-batch-images", "2"), 2),
    ],
)
def test_batch_images_default_by_device(argv, images):
    assert _config(*argv).max_batch_images == images


def test_zero_batch_images_is_refused():
    with pytest.raises(ValueError, match="max_batch_images must be positive"):
        _config("--max-batch-images", "0")


@pytest.mark.parametrize(
    ("argv", "wait_s"),
    [
        ((), CPU_MAX_WAIT_MS / 1000),
        (("--device", "cuda"), EncoderConfig.max_wait_s),
        (("--max-wait-ms", "2"), 0.002),
        (("--device", "cuda", "--max-wait-ms", "0"), 0.0),
    ],
)
def test_batch_wait_default_by_device(argv, wait_s):
    assert CPU_MAX_WAIT_MS == 0.0  # an idle CPU tower starts on the first image
    assert _config(*argv).max_wait_s == wait_s
