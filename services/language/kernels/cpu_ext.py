"""The C++ CPU kernels (`csrc/`: fused MoE experts, paged attention, norms and rotary
embedding), one extension built on first use.

They need AVX-512 (F, BW, VL); `torch.utils.cpp_extension` compiles them with gcc, which takes
~20-30 s once per machine (`make venv` does it: `python -m services.language.kernels.cpu_ext`),
then caches the build in a directory named after a digest of the sources, flags and torch
version under $TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions): later loads take
~0.01 s. Processes that start together build once: an flock (released by the kernel if its
holder dies) serialises them, so a build killed half way never leaves the others waiting on
torch's own lock file, which nothing would remove. Where the kernels cannot be built (no AVX-512,
no working compiler) `extension()` is None, the reason is logged once, and the kernel registry
keeps the torch reference.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import sys
import time
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("module.cpp", "cpu_moe.cpp", "cpu_attention.cpp", "cpu_norm.cpp")
HEADERS = ("vec_math.h",)
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp"]


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return frozenset(line.split(":", 1)[-1].split())


def supported() -> bool:
    """Whether this CPU runs the kernels (AVX-512 F, BW and VL)."""
    return {"avx512f", "avx512bw", "avx512vl"} <= cpu_flags()


def has_bf16_dot() -> bool:
    return "avx512_bf16" in cpu_flags()


@functools.cache
def extension() -> ModuleType | None:
    """The compiled kernels, or None (logged) when they cannot be built here."""
    if not supported():
        log.info("no AVX-512 on this CPU: the CPU kernels are the torch reference")
        return None
    from torch.utils.cpp_extension import load

    t0 = time.perf_counter()
    build = build_directory()
    build.mkdir(parents=True, exist_ok=True)
    try:
        with (build / "epd.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others then load
            (build / "lock").unlink(missing_ok=True)  # torch's, left by a killed build
            module = load(
                name="epd_cpu_kernels",
                sources=[str(CSRC / s) for s in SOURCES],
                extra_cflags=CFLAGS,
                extra_ldflags=["-fopenmp"],
                build_directory=str(build),
                verbose=os.environ.get("EPD_CPP_VERBOSE") == "1",
            )
    except Exception as e:  # no compiler, an old one: the reference serves instead
        log.warning("the C++ CPU kernels could not be built (%s); using the torch reference", e)
        return None
    log.info("C++ CPU kernels ready in %.2f s", time.perf_counter() - t0)
    return module


def build_directory() -> Path:
    import torch

    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update((CSRC / name).read_bytes())
    # The torch install too: its include paths are in the build's flags, so two virtualenvs
    # sharing one directory would rebuild it in turn (about a minute each time on 2 cores).
    digest.update(" ".join([*CFLAGS, torch.__version__, sys.version, torch.__file__]).encode())
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / f"epd_cpu_kernels-{digest.hexdigest()[:16]}"


if __name__ == "__main__":  # `make venv`: build once, before any test or service needs them
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    print("C++ CPU kernels:", "ready" if extension() is not None else "not available here")
