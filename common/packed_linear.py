"""Linear layers on CPU through oneDNN with weights packed once, at load.

torch's CPU `F.linear` in fp32 goes to MKL, which on non-Intel x86 CPUs (this project's AMD EPYC
test machines) stays on a slower code path: 71-214 GFLOP/s at 8-1536 rows of a 512 -> 768
layer on 2 threads, where oneDNN's matmul on weights reordered once into its blocked layout
makes 175-504 GFLOP/s (2.2-2.5x from 8 rows up; the same at 1 row, where the weight's read
bounds both). In bf16 `F.linear` already takes oneDNN but reorders the weight on every call; the
packed weight gives the same bits 1.1-1.7x faster.

fp32 results differ from MKL's in summation order only (relative ~5e-6). A row's result did not
depend on the other rows in the call for 512->768, 512->4096, 256->768 and 1024->256 layers
(1 to 1999 rows); for a 1536-wide input (the vision patch conv) it did, which is why that one
runs one call per image.

`pack_linears(module)` swaps every `nn.Linear` of a CPU module (exact type: subclasses such as
tensor-parallel layers keep their own forward; not a tied weight) for a `PackedLinear` holding
the packed weight as its parameter (same shape, dtype and byte count). Nothing is packed when
oneDNN is absent, for other devices and dtypes, or with `EPD_KERNELS=torch` (the plain-torch
reference everywhere).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def onednn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(
        torch.ops.mkldnn, "_linear_pointwise"
    )


def packable(weight: torch.Tensor) -> bool:
    """Whether `weight [N, K]` can be packed: a CPU fp32/bf16 matrix, oneDNN present, and the
    reference not forced (`EPD_KERNELS=torch`)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in DTYPES
        and weight.ndim == 2
        and os.environ.get("EPD_KERNELS") != "torch"
        and onednn_available()
    )


class PackedLinear(nn.Module):
    """`nn.Linear`'s forward on a weight in oneDNN's layout (an opaque tensor: no strides)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., K] -> [..., N]; the op takes any leading shape and strided rows.
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            x, self.weight, self.bias, "none", [], ""
        )
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def linear_gelu(layer: nn.Module, x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """`F.gelu(layer(x), approximate=...)`, the GELU fused into the GEMM as oneDNN's post-op
    when `layer` is packed (erf: the same bits; tanh: within 5e-7; one pass over the output
    fewer)."""
    if isinstance(layer, PackedLinear):
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            x, layer.weight, layer.bias, "gelu", [], approximate
        )
        return out
    return F.gelu(layer(x), approximate=approximate)


def pack_linears(module: nn.Module) -> int:
    """Swap every packable `nn.Linear` under `module` for a `PackedLinear`; returns how many. A
    weight shared with another module (tied embeddings) stays shared: packing would copy it."""
    uses: dict[int, int] = {}  # parameters per memory address (tied ones share theirs)
    for _, p in module.named_parameters(remove_duplicate=False):
        if p.layout == torch.strided:
            uses[p.data_ptr()] = uses.get(p.data_ptr(), 0) + 1
    swaps = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
        and packable(child.weight)
        and uses.get(child.weight.data_ptr()) == 1
    ]
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child.weight, child.bias))
    return len(swaps)
