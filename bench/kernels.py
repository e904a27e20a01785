"""`epd bench-kernels`: one MoE layer, Triton vs the torch reference, at real expert shapes (GPU).

For each model's expert shape and token count: median time of each kernel (CUDA events via
`triton.testing.do_bench`), the bytes of activated expert weights read (distinct experts hit x
3*H*I*elem) over the Triton time against the HBM peak, and 2*T*K*3*H*I FLOPs over that time
against the dense bf16 peak. Peaks default to the datasheet of the detected card.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import torch

# name -> (experts E, top-k K, hidden H, expert width I)
SHAPES: dict[str, tuple[int, int, int, int]] = {
    "30B-A3B": (128, 8, 2048, 768),
    "235B-A22B": (128, 8, 4096, 1536),
}
TOKENS = (1, 8, 32, 128, 1024, 4096)
# card name substring -> (HBM bytes/s, dense bf16 FLOP/s), datasheet values (SXM parts)
PEAKS: dict[str, tuple[float, float]] = {"H200": (4.8e12, 989e12), "H100": (3.35e12, 989e12)}


@dataclass
class Row:
    model: str
    tokens: int
    experts_hit: int
    triton_ms: float
    torch_ms: float | None
    speedup: float | None
    hbm_gb_s: float
    hbm_frac: float
    tflops: float
    flop_frac: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help='print {"rows": [...]} as JSON')
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated")
    parser.add_argument("--models", default=",".join(SHAPES), help="comma-separated shape names")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--peak-gb-s", type=float, help="HBM peak in GB/s (default: datasheet)")
    parser.add_argument("--peak-tflops", type=float, help="bf16 peak (default: datasheet)")
    parser.add_argument(
        "--torch-max-tokens", type=int, default=4096, help="skip the torch reference above this"
    )


def peaks(name: str, gb_s: float | None, tflops: float | None) -> tuple[float, float]:
    bw, flops = next((p for key, p in PEAKS.items() if key in name), PEAKS["H100"])
    return (gb_s * 1e9 if gb_s else bw), (tflops * 1e12 if tflops else flops)


def format_table(rows: list[Row], device: str) -> str:
    head = (f"{'model':<10} {'tokens':>6} {'hit':>4} {'triton ms':>10} {'torch ms':>9} "
            f"{'x':>6} {'GB/s':>7} {'%HBM':>5} {'TFLOP/s':>8} {'%bf16':>6}")  # fmt: skip
    lines = [f"MoE layer on {device}", head, "-" * len(head)]
    for r in rows:
        torch_ms = f"{r.torch_ms:9.3f}" if r.torch_ms is not None else f"{'-':>9}"
        speedup = f"{r.speedup:6.1f}" if r.speedup is not None else f"{'-':>6}"
        lines.append(
            f"{r.model:<10} {r.tokens:>6} {r.experts_hit:>4} {r.triton_ms:10.3f} {torch_ms} "
            f"{speedup} {r.hbm_gb_s:7.0f} {100 * r.hbm_frac:5.1f} {r.tflops:8.1f} "
            f"{100 * r.flop_frac:6.1f}"
        )
    return "\n".join(lines)


def bench_one(
    model: str, t: int, dtype: torch.dtype, peak_bw: float, peak_flops: float, torch_max: int
) -> Row:
    import triton.testing

    from services.language.kernels import torch_ref, triton_moe

    e, k, h, i = SHAPES[model]
    gen = torch.Generator(device="cuda").manual_seed(t)
    x = torch.randn(t, h, device="cuda", generator=gen).to(dtype)
    gate_up = (torch.randn(e, 2 * i, h, device="cuda", generator=gen) / h**0.5).to(dtype)
    down = (torch.randn(e, h, i, device="cuda", generator=gen) / i**0.5).to(dtype)
    logits = torch.randn(t, e, device="cuda", generator=gen)
    weights, experts = torch.topk(logits.softmax(-1), k)
    weights = (weights / weights.sum(-1, keepdim=True)).to(dtype)
    args = (x, gate_up, down, weights, experts)
    ms = triton.testing.do_bench(lambda: triton_moe.fused_moe(*args), return_mode="median")
    ref_ms = None
    if t <= torch_max:
        ref_ms = triton.testing.do_bench(
            lambda: torch_ref.fused_moe(*args), warmup=5, rep=50, return_mode="median"
        )
    hit = int(torch.unique(experts).numel())
    nbytes = hit * 3 * h * i * x.element_size()
    flops = 2 * t * k * 3 * h * i
    return Row(
        model, t, hit, ms, ref_ms, (ref_ms / ms) if ref_ms else None,
        nbytes / ms / 1e6, nbytes / (ms * 1e-3) / peak_bw,
        flops / ms / 1e9, flops / (ms * 1e-3) / peak_flops,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("epd bench-kernels needs a CUDA GPU (the Triton kernels are timed on it)")
        return 2
    dtype = getattr(torch, args.dtype)
    device = torch.cuda.get_device_name()
    peak_bw, peak_flops = peaks(device, args.peak_gb_s, args.peak_tflops)
    rows = [
        bench_one(m, int(t), dtype, peak_bw, peak_flops, args.torch_max_tokens)
        for m in args.models.split(",")
        for t in args.tokens.split(",")
    ]
    if args.json:
        out = {"device": device, "peak_hbm_b_s": peak_bw, "peak_flop_s": peak_flops}
        print(json.dumps({**out, "rows": [asdict(r) for r in rows]}, indent=2))
    else:
        print(format_table(rows, device))
    return 0
