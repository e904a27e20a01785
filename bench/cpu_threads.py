"""How many torch threads each process should run when the encoder and the language service
share the machine's cores (as under `epd up`).

Two child processes, started together behind a barrier, each loop for `seconds`:

- language: the decoder's forward over 8 new tokens of one sequence with 128 cached (the GEMM
  shapes of a batch-8 decode step; the checkpoint's real weights);
- encoder: the vision tower on one 224x224 image.

Each configuration sets `torch.set_num_threads` in each child (and optionally
`OMP_WAIT_POLICY`); the report gives every process's iterations per second, alone and side by
side, and the language process's time per iteration. A role that is alone shows what threads
buy it; side by side shows what oversubscribing the cores (2 + 2 threads on 2 cores) costs.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
from typing import Any

CONFIGS: list[tuple[str, int | None, int | None, str | None]] = [
    # label, language threads, encoder threads (None = not running), OMP_WAIT_POLICY
    ("language alone, 2 threads", 2, None, None),
    ("language alone, 1 thread", 1, None, None),
    ("encoder alone, 2 threads", None, 2, None),
    ("encoder alone, 1 thread", None, 1, None),
    ("both, 2 + 2 threads", 2, 2, None),
    ("both, 1 + 1 threads", 1, 1, None),
    ("both, 2 + 2, OMP_WAIT_POLICY=passive", 2, 2, "passive"),
]


def _child(role: str, model: str, threads: int, seconds: float, barrier: Any, out: Any) -> None:
    import torch

    from services.colocated import ColocatedPipeline
    from services.language.attention import ContiguousKVCache

    torch.set_num_threads(threads)
    pipe = ColocatedPipeline(model)
    t = pipe.cfg.text
    if role == "language":
        x = torch.randn(8, t.hidden_size)
        pos = torch.arange(128, 136).expand(3, -1)

        def step() -> None:
            cache = ContiguousKVCache(
                t.num_hidden_layers, t.num_key_value_heads, t.head_dim, 136, pipe.dtype
            )
            cache.length = 128  # attend over 128 cached positions (their values do not matter)
            pipe.decoder.compute_logits(pipe.decoder(x, pos, cache)[-1:])
    else:
        from bench.generate import synthetic_image

        image = synthetic_image(224, 224, 1)

        def step() -> None:
            pipe.encode_images([image])

    with torch.inference_mode():
        for _ in range(3):
            step()
        barrier.wait()
        times = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    out.put((role, len(times) / sum(times), statistics.median(times)))


def run_threads(model: str, seconds: float) -> list[dict[str, Any]]:
    from tqdm import tqdm

    ctx = mp.get_context("spawn")
    rows = []
    for label, lang, enc, policy in tqdm(CONFIGS, desc="threads", unit="config"):
        roles = [(r, n) for r, n in (("language", lang), ("encoder", enc)) if n]
        barrier, out = ctx.Barrier(len(roles)), ctx.Queue()
        old = os.environ.get("OMP_WAIT_POLICY")
        if policy:
            os.environ["OMP_WAIT_POLICY"] = policy  # read by libgomp when the child starts
        procs = [
            ctx.Process(target=_child, args=(r, model, n, seconds, barrier, out)) for r, n in roles
        ]
        for p in procs:
            p.start()
        results = {}
        for _ in procs:
            role, per_s, median = out.get()
            results[role] = {"iterations_per_s": per_s, "median_ms": median * 1e3}
        for p in procs:
            p.join()
        if policy:
            if old is None:
                os.environ.pop("OMP_WAIT_POLICY")
            else:
                os.environ["OMP_WAIT_POLICY"] = old
        rows.append({"config": label, **results})
    return rows


def print_threads(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'threads':<40}{'language it/s':>14}{'(ms/it)':>9}{'encoder it/s':>14}"
          f"{'(ms/it)':>9}")  # fmt: skip
    for r in rows:
        cols = ""
        for role in ("language", "encoder"):
            if role in r:
                cols += f"{r[role]['iterations_per_s']:>14.1f}{r[role]['median_ms']:>9.1f}"
            else:
                cols += f"{'-':>14}{'':>9}"
        print(f"{r['config']:<40}{cols}")
