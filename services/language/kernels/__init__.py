"""Compute kernels of the decoder behind small interfaces, chosen by device (never by model name).

`torch_ref` holds the plain-torch reference implementations, which run everywhere and define the
expected results; GPU kernels register next to them and are selected for CUDA tensors.
"""

from __future__ import annotations

from services.language.kernels.torch_ref import paged_attention

__all__ = ["paged_attention"]
