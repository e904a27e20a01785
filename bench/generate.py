"""`epd bench-generate`: prefill and decode tokens/s of `epd generate` vs transformers, one run.

Both sides run the same checkpoint, image, prompt and dtype in this process, alternating, and the
median of `--repeats` runs is reported. For each side:

- prefill tok/s = prompt tokens / (image preprocessing + vision tower + prefill forward), i.e. the
  time to the first token;
- decode tok/s = (output tokens - 1) / (time after the first token).

transformers' times come from one `generate(max_new_tokens=N, min_new_tokens=N)` with a per-token
clock (bench/hf.py); ours from the pipeline's own stage timers with `ignore_eos`, so both
produce exactly N tokens.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.hf import HFReference, HFRequest
from common.contract import SamplingParams
from common.dtypes import DTYPES
from services.colocated import ColocatedPipeline


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (e.g. a `small` one)")
    parser.add_argument("--image-size", default="448x448", help="WxH of the synthetic image")
    parser.add_argument("--images", type=int, default=1, help="images per prompt (0 = text only)")
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def synthetic_image(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def run(args: argparse.Namespace) -> int:

    width, height = (int(v) for v in args.image_size.lower().split("x"))
    images = [synthetic_image(width, height, i) for i in range(args.images)]
    prompt = "Describe the image in as much detail as you can, then list every object you see."
    n = args.output_tokens
    ours = ColocatedPipeline(args.model, dtype=args.dtype)
    params = SamplingParams(max_tokens=n, ignore_eos=True)
    eos = ours.tokenizer.eos_token_ids
    hf = HFReference(args.model, ours.cfg, DTYPES[args.dtype], eos[-1] if eos else 0)
    rows: dict[str, list[tuple[float, float]]] = {"epd": [], "transformers": []}
    prompt_tokens = 0
    for rep in range(args.repeats + 1):  # the first round warms both up and is not counted
        result = ours.generate(images, prompt, params)
        t = result.timings
        prompt_tokens = result.prompt_tokens
        ids = ours.prompt_ids(prompt, len(images), _counts(ours, images))
        start, stamps = hf.generate([HFRequest(ids, images)], n)
        if rep:
            rows["epd"].append((t["preprocess"] + t["encode"] + t["prefill"], t["decode"]))
            rows["transformers"].append((stamps[0] - start, stamps[-1] - stamps[0]))
    report = _report(rows, prompt_tokens, n, args, torch.get_num_threads())
    if args.json:
        print(json.dumps(report))
    else:
        _print_table(report)
    return 0


def _counts(ours: ColocatedPipeline, images: list[bytes]) -> list[int]:
    return [e.shape[0] for e in ours.encode_images(images)[0]] if images else []


def _report(
    rows: dict[str, list[tuple[float, float]]],
    prompt_tokens: int,
    n: int,
    args: argparse.Namespace,
    threads: int,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": str(Path(args.model)),
        "dtype": args.dtype,
        "images": args.images,
        "image_size": args.image_size,
        "prompt_tokens": prompt_tokens,
        "output_tokens": n,
        "repeats": args.repeats,
        "torch_threads": threads,
        "systems": {},
    }
    for name, samples in rows.items():
        ttft = statistics.median(s[0] for s in samples)
        decode = statistics.median(s[1] for s in samples)
        out["systems"][name] = {
            "ttft_s": ttft,
            "prefill_tok_s": prompt_tokens / ttft,
            "decode_tok_s": (n - 1) / decode,
        }
    e, h = out["systems"]["epd"], out["systems"]["transformers"]
    out["ratio_prefill"] = e["prefill_tok_s"] / h["prefill_tok_s"]
    out["ratio_decode"] = e["decode_tok_s"] / h["decode_tok_s"]
    return out


def _print_table(r: dict[str, Any]) -> None:
    print(
        f"model {r['model']} ({r['dtype']}, {r['torch_threads']} threads): {r['images']} image(s) "
        f"{r['image_size']}, {r['prompt_tokens']} prompt tokens, {r['output_tokens']} output "
        f"tokens, median of {r['repeats']}"
    )
    print(f"{'system':<14}{'TTFT s':>10}{'prefill tok/s':>16}{'decode tok/s':>15}")
    for name, s in r["systems"].items():
        print(
            f"{name:<14}{s['ttft_s']:>10.3f}{s['prefill_tok_s']:>16.1f}{s['decode_tok_s']:>15.1f}"
        )
    print(
        f"ratio epd/transformers: prefill {r['ratio_prefill']:.2f}x, "
        f"decode {r['ratio_decode']:.2f}x"
    )
