"""The C++ CPU kernels (`csrc/`: fused MoE experts, decode attention), one extension built on
first use.

They need AVX-512 (F, BW, VL); `torch.utils.cpp_extension` compiles them with gcc, which takes
~20-30 s once per machine, then caches the build in $TORCH_EXTENSIONS_DIR (default
~/.cache/torch_extensions): later loads take ~0.01 s. Where they cannot be built (no AVX-512, no
working compiler) `extension()` is None, the reason is logged once, and the kernel registry keeps
the torch reference.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("module.cpp", "cpu_moe.cpp", "cpu_attention.cpp")
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
    try:
        module = load(
            name="epd_cpu_kernels",
            sources=[str(CSRC / s) for s in SOURCES],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            verbose=os.environ.get("EPD_CPP_VERBOSE") == "1",
        )
    except Exception as e:  # no compiler, an old one: the reference serves instead
        log.warning("the C++ CPU kernels could not be built (%s); using the torch reference", e)
        return None
    log.info("C++ CPU kernels ready in %.2f s", time.perf_counter() - t0)
    return module
