"""Decode attention on the CPU: the engine's paged gather + SDPA against SDPA over K/V that is
already contiguous per sequence (what a kernel reading the paged blocks in place, or a cache
laid out per sequence, would approach), one layer, in one run.

For B sequences of `context` tokens each (block size 16, blocks scattered in a cache as a busy
engine leaves them), one decode step: query `[B, Hq, hd]`. Timed per formulation (warm-up, then
rounds rotating the order; medians and per-round ratios to the paged path):

- paged (engine): `torch_ref.paged_attention` with the `PagedMeta` of `prepare_paged` built once
  per forward (its cost is shown apart: the engine builds it once per step for all layers);
- contiguous SDPA: the same batched SDPA (GQA as query rows per KV head, padding mask) over
  `[B, Hkv, L, hd]` K/V stored contiguously, i.e. without the `index_select` copy;
- contiguous, per sequence: one SDPA call per sequence over its own `[1, Hkv, L_i, hd]`.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from services.language.kernels import torch_ref

HEADS = {"small": (8, 2, 64), "a3b-4layer": (32, 4, 128)}  # Hq, Hkv, head_dim


def measure_attention(
    shape: str, dtype: torch.dtype, batch: int, context: int, repeats: int, seed: int = 0
) -> dict[str, Any]:
    hq, hkv, hd = HEADS[shape]
    g = torch.Generator().manual_seed(seed)
    block = 16
    nblocks = batch * (-(-context // block))
    slots_total = 4 * nblocks * block  # the cache is 4x larger than what these sequences use
    k_cache = torch.randn(slots_total, hkv, hd, generator=g).to(dtype)
    v_cache = torch.randn(slots_total, hkv, hd, generator=g).to(dtype)
    perm = torch.randperm(slots_total // block, generator=g)[:nblocks].tolist()
    # contexts vary a little, as in a real batch: context - 15 .. context
    lengths = [context - (i * 7) % 16 for i in range(batch)]
    seqs, per_seq = [], []
    for i, length in enumerate(lengths):
        table = torch.tensor(perm[i * (nblocks // batch) : (i + 1) * (nblocks // batch)])
        idx = torch.arange(length)
        slots = table[idx // block] * block + idx % block
        seqs.append((i, 1, slots))
        per_seq.append((k_cache[slots].transpose(0, 1)[None], v_cache[slots].transpose(0, 1)[None]))
    q = torch.randn(batch, hq, hd, generator=g).to(dtype)
    width = max(lengths)
    k_cont = torch.zeros(batch, hkv, width, hd, dtype=dtype)
    v_cont = torch.zeros(batch, hkv, width, hd, dtype=dtype)
    for i, (k, v) in enumerate(per_seq):
        k_cont[i, :, : lengths[i]] = k[0]
        v_cont[i, :, : lengths[i]] = v[0]
    valid = (torch.arange(width)[None] < torch.tensor(lengths)[:, None])[:, None, None, :]
    scale = hd**-0.5
    meta = torch_ref.prepare_paged(seqs)

    def paged() -> torch.Tensor:
        return torch_ref.paged_attention(q, k_cache, v_cache, meta, scale)

    def contiguous() -> torch.Tensor:
        o = F.scaled_dot_product_attention(
            q.reshape(batch, hkv, hq // hkv, hd), k_cont, v_cont, attn_mask=valid, scale=scale
        )
        return o.reshape(batch, hq, hd)

    def per_sequence() -> torch.Tensor:
        outs = [
            F.scaled_dot_product_attention(
                q[i].reshape(1, hkv, hq // hkv, hd), k, v, scale=scale
            ).reshape(hq, hd)
            for i, (k, v) in enumerate(per_seq)
        ]
        return torch.stack(outs)

    fns = {
        "paged (engine)": paged,
        "contiguous SDPA": contiguous,
        "contiguous, per seq": per_sequence,
    }
    with torch.inference_mode():
        ref = paged()
        diffs = {n: (f().float() - ref.float()).abs().max().item() for n, f in fns.items()}
        times: dict[str, list[float]] = {n: [] for n in fns}
        names = list(fns)
        for r in range(repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
        meta_times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch_ref.prepare_paged(seqs)
            meta_times.append(time.perf_counter() - t0)
    base = times[names[0]]
    return {
        "shape": shape, "dtype": str(dtype).removeprefix("torch."), "batch": batch,
        "context": context, "prepare_paged_ms": statistics.median(meta_times) * 1e3,
        "rows": [
            {"formulation": n, "median_ms": statistics.median(times[n]) * 1e3,
             "speedup": statistics.median(a / b for a, b in zip(base, times[n], strict=True)),
             "max_abs_diff": diffs[n]}
            for n in names
        ],
    }  # fmt: skip


def print_attention(cells: list[dict[str, Any]]) -> None:
    print(f"\n{'attention':<22}{'B':>4}{'ctx':>6}  {'formulation':<22}{'median ms':>10}"
          f"{'speed-up':>10}{'max|d|':>10}")  # fmt: skip
    for c in cells:
        head = f"{c['shape']} {c['dtype']}"
        for r in c["rows"]:
            cols = f"{r['median_ms']:>10.3f}{r['speedup']:>9.2f}x{r['max_abs_diff']:>10.1e}"
            print(f"{head:<22}{c['batch']:>4}{c['context']:>6}  {r['formulation']:<22}{cols}")
            head = ""
        print(f"{'':<32}  (prepare_paged once per step: {c['prepare_paged_ms']:.3f} ms)")
