"""The MoE expert formulations of `services/language/kernels/cpu_moe.py` against the engine's
`torch_ref.fused_moe`, one layer, in one run.

For each preset's shapes (`small`; `a3b-4layer` = Qwen3-VL-30B-A3B: H 2048, I 768, 128 experts
top-8), dtype and token count, random weights and a softmax top-k router over random logits
give the routing; every formulation gets the same inputs. Timing: a warm-up call each, then
`--repeats` rounds in which every formulation runs once, the order rotating per round; the
report gives each one's median, the median of its per-round ratio to the reference (speed-up,
>1 = faster), the expert-weight bytes it had to read per call (experts that received rows)
over its median time, and its max abs difference to the reference (fp32) or to fp32 math on the
same bf16 values (bf16; the reference's own difference is shown for scale). `torch.compile` of
the reference is timed too, with the compile time of its first call for each token count.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from services.language.kernels import cpu_moe, torch_ref

Fn = Callable[[], torch.Tensor]


def prepare_active_loop(w: torch.Tensor) -> torch.Tensor:
    """`w [E, N, K]` -> contiguous `[E, K, N]`, the `x @ w[e]` operand (the storage that
    `torch_ref.grouped_mm_layout` keeps; there it is viewed back as `[E, N, K]`)."""
    return w.transpose(-2, -1).contiguous()


def active_loop(
    x: torch.Tensor,
    gate_up_kn: torch.Tensor,
    down_kn: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
) -> torch.Tensor:
    """gate_up_kn `[E, H, 2I]`, down_kn `[E, I, H]` (from `prepare_active_loop`)."""
    t, k = experts.shape
    flat = experts.flatten()  # [T*K]
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=gate_up_kn.shape[0]).tolist()
    routing = weights.flatten()
    out = x.new_empty(t * k, x.shape[1])
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        idx = order[start : start + n]  # [n] rows of the [T*K] layout routed to expert e
        start += n
        gate, up = torch.mm(x[idx // k], gate_up_kn[e]).chunk(2, dim=-1)  # [n, I] each
        y = torch.mm(F.silu(gate) * up, down_kn[e])  # [n, H]
        out[idx] = y * routing[idx, None]
    return out.view(t, k, -1).sum(dim=1)


@dataclass(frozen=True)
class MoeShape:
    name: str
    hidden: int
    intermediate: int
    experts: int
    top_k: int


SHAPES = {
    "small": MoeShape("small", 512, 384, 16, 4),
    "a3b-4layer": MoeShape("a3b-4layer", 2048, 768, 128, 8),
}


def routing(tokens: int, shape: MoeShape, dtype: torch.dtype, seed: int) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, shape.hidden, generator=g).to(dtype)
    probs = torch.softmax(torch.randn(tokens, shape.experts, generator=g), dim=-1)
    w, experts = torch.topk(probs, shape.top_k, dim=-1)
    return x, (w / w.sum(-1, keepdim=True)).to(dtype), experts


def expert_weights(shape: MoeShape, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """gate_up `[E, 2I, H]`, down `[E, H, I]`, scaled like an initialised layer."""
    g = torch.Generator().manual_seed(seed)
    e, h, i = shape.experts, shape.hidden, shape.intermediate
    gate_up = (torch.randn(e, 2 * i, h, generator=g) * h**-0.5).to(dtype)
    down = (torch.randn(e, h, i, generator=g) * i**-0.5).to(dtype)
    return gate_up, down


def formulations(
    shape: MoeShape, dtype: torch.dtype, gate_up: torch.Tensor, down: torch.Tensor
) -> dict[str, Callable[..., torch.Tensor]]:
    """name -> fn(x, weights, experts); the weights prepared once, as a load would."""
    ref_gu, ref_dn = torch_ref.grouped_mm_layout(gate_up), torch_ref.grouped_mm_layout(down)
    # The K-major storage the engine keeps is already active_loop's operand: no second copy.
    kn_gu, kn_dn = ref_gu.transpose(-2, -1), ref_dn.transpose(-2, -1)
    pk_gu, pk_dn = cpu_moe.prepare_cpp(gate_up), cpu_moe.prepare_cpp(down)
    out: dict[str, Callable[..., torch.Tensor]] = {
        "reference (grouped_mm)": lambda x, w, e: torch_ref.fused_moe(x, ref_gu, ref_dn, w, e),
        "active experts, torch.mm": lambda x, w, e: active_loop(x, kn_gu, kn_dn, w, e),
        "C++ tiles (fp32 FMA)": lambda x, w, e: cpu_moe.cpp_moe(x, pk_gu, pk_dn, w, e),
    }
    if dtype == torch.bfloat16:
        dp_gu, dp_dn = cpu_moe.prepare_cpp(gate_up, True), cpu_moe.prepare_cpp(down, True)
        out["C++ tiles (vdpbf16ps)"] = lambda x, w, e: cpu_moe.cpp_moe(
            x, dp_gu, dp_dn, w, e, dpbf16=True
        )
    compiled = torch.compile(torch_ref.fused_moe, dynamic=False)
    out["torch.compile(reference)"] = lambda x, w, e: compiled(x, ref_gu, ref_dn, w, e)
    return out


def measure_cell(
    shape: MoeShape,
    dtype: torch.dtype,
    tokens: int,
    fns: dict[str, Callable[..., torch.Tensor]],
    gate_up: torch.Tensor,
    down: torch.Tensor,
    repeats: int,
    seed: int,
) -> dict[str, Any]:
    x, w, experts = routing(tokens, shape, dtype, seed)
    active = int(torch.unique(experts).numel())
    weight_bytes = active * 3 * shape.hidden * shape.intermediate * gate_up.element_size()
    with torch.inference_mode():
        truth = torch_ref.fused_moe(x.float(), gate_up.float(), down.float(), w.float(), experts)
        first: dict[str, float] = {}
        outs: dict[str, torch.Tensor] = {}
        failed: dict[str, str] = {}
        for name, fn in fns.items():
            t0 = time.perf_counter()
            try:
                outs[name] = fn(x, w, experts)
            except Exception as e:  # a formulation that cannot run these inputs: say why
                failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                continue
            first[name] = time.perf_counter() - t0
            fn(x, w, experts)
        names = [n for n in fns if n not in failed]
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                fns[name](x, w, experts)
                times[name].append(time.perf_counter() - t0)
    ref_name = names[0]
    rows = []
    for name in names:
        med = statistics.median(times[name])
        rows.append({
            "formulation": name, "median_ms": med * 1e3,
            "speedup": statistics.median(
                a / b for a, b in zip(times[ref_name], times[name], strict=True)
            ),
            "weights_gb_s": weight_bytes / med / 1e9,
            "first_call_s": first[name],
            "max_abs_diff_vs_ref": (outs[name].float() - outs[ref_name].float()).abs().max().item(),
            "max_abs_diff_vs_fp32": (outs[name].float() - truth).abs().max().item(),
        })  # fmt: skip
    return {
        "shape": shape.name, "dtype": str(dtype).removeprefix("torch."), "tokens": tokens,
        "active_experts": active, "weight_mb_read": weight_bytes / 2**20,
        "output_abs_max": truth.abs().max().item(), "rows": rows, "failed": failed,
    }  # fmt: skip


def run_moe(
    shapes: list[str], dtypes: list[torch.dtype], tokens: list[int], repeats: int, seed: int
) -> list[dict[str, Any]]:
    from tqdm import tqdm

    cells = []
    bar = tqdm(total=len(shapes) * len(dtypes) * len(tokens), desc="moe", unit="cell")
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        for dtype in dtypes:
            gate_up, down = expert_weights(shape, dtype, seed)
            fns = formulations(shape, dtype, gate_up, down)
            for t in tokens:
                cells.append(measure_cell(shape, dtype, t, fns, gate_up, down, repeats, seed + t))
                bar.update(1)
            del fns, gate_up, down
    bar.close()
    return cells


def print_moe(cells: list[dict[str, Any]], cpp_load_s: float) -> None:
    print(f"C++ extension: load_inline took {cpp_load_s:.1f} s in this process "
          "(a compile when $TORCH_EXTENSIONS_DIR has no build of this source)")  # fmt: skip
    for c in cells:
        print(f"\n{c['shape']} {c['dtype']} T={c['tokens']}: {c['active_experts']} experts "
              f"with rows, {c['weight_mb_read']:.0f} MB of their weights; |out| max "
              f"{c['output_abs_max']:.2f}")  # fmt: skip
        diff = "max|d| vs ref" if c["dtype"] == "float32" else "max|d| vs fp32"
        print(f"  {'formulation':<28}{'median ms':>11}{'speed-up':>10}{'GB/s':>7}"
              f"{'1st call s':>11}{diff:>15}")  # fmt: skip
        key = "max_abs_diff_vs_ref" if c["dtype"] == "float32" else "max_abs_diff_vs_fp32"
        for r in c["rows"]:
            cols = f"{r['weights_gb_s']:>7.1f}{r['first_call_s']:>11.2f}{r[key]:>15.2e}"
            print(f"  {r['formulation']:<28}{r['median_ms']:>11.3f}{r['speedup']:>9.2f}x{cols}")
        for name, why in c["failed"].items():
            print(f"  {name:<28} failed: {why}")
