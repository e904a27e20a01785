"""`epd bench-generate`: prefill and decode tokens/s of `epd generate` vs transformers, one run.

Both sides run the same checkpoint, image, prompt and dtype in this process, alternating, and the
median of `--repeats` runs is reported. For each side:

- prefill tok/s = prompt tokens / (image preprocessing + vision tower + prefill forward), i.e. the
  time to the first token;
- decode tok/s = (output tokens - 1) / (time after the first token).

transformers' split is measured as `generate(max_new_tokens=1)` (time to first token) and
`generate(max_new_tokens=N, min_new_tokens=N)` minus it; ours comes from the pipeline's own stage
timers with `ignore_eos`, so both produce exactly N tokens.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from services.colocated import DTYPES, ColocatedPipeline
from services.language.engine.request import SamplingParams


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
    import transformers as tf

    width, height = (int(v) for v in args.image_size.lower().split("x"))
    images = [synthetic_image(width, height, i) for i in range(args.images)]
    prompt = "Describe the image in as much detail as you can, then list every object you see."
    n = args.output_tokens
    ours = ColocatedPipeline(args.model, dtype=args.dtype)
    params = SamplingParams(max_tokens=n, ignore_eos=True)
    cls: Any = {
        "qwen3_vl_moe": tf.Qwen3VLMoeForConditionalGeneration,
        "qwen3_vl": tf.Qwen3VLForConditionalGeneration,
        "qwen3_moe": tf.Qwen3MoeForCausalLM,
    }[ours.cfg.model_type]
    hf = cls.from_pretrained(args.model, dtype=DTYPES[args.dtype]).eval()
    processor = tf.Qwen2VLImageProcessorPil.from_pretrained(args.model) if ours.cfg.vision else None
    rows: dict[str, list[tuple[float, float]]] = {"epd": [], "transformers": []}
    prompt_tokens = 0
    for rep in range(args.repeats + 1):  # the first round warms both up and is not counted
        result = ours.generate(images, prompt, params)
        t = result.timings
        ttft_ours = t["preprocess"] + t["encode"] + t["prefill"]
        prompt_tokens = result.prompt_tokens
        ttft_hf, total_hf = _time_hf(hf, processor, ours, images, prompt, n)
        if rep:
            rows["epd"].append((ttft_ours, t["decode"]))
            rows["transformers"].append((ttft_hf, total_hf - ttft_hf))
    report = _report(rows, prompt_tokens, n, args, torch.get_num_threads())
    if args.json:
        print(json.dumps(report))
    else:
        _print_table(report)
    return 0


def _time_hf(
    hf: Any, processor: Any, ours: ColocatedPipeline, images: list[bytes], prompt: str, n: int
) -> tuple[float, float]:
    """(time to first token, total time) of transformers' generate for the same request."""

    def inputs() -> dict[str, Any]:
        # The same prompt ids as ours (checked equal to transformers' own in the parity tests).
        out: dict[str, Any] = {}
        counts = []
        if images:
            px = processor(images=[Image.open(io.BytesIO(b)) for b in images], return_tensors="pt")
            out.update(pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"])
            counts = [int(g.prod()) // 4 for g in px["image_grid_thw"]]
        ids = torch.tensor([ours.prompt_ids(prompt, len(images), counts)])
        out["input_ids"] = ids
        if ours.cfg.vision is not None:
            out["mm_token_type_ids"] = torch.eq(ids, int(ours.cfg.image_token_id or -1)).int()
        return out

    times = []
    for tokens in (1, n):
        with torch.inference_mode():
            start = time.perf_counter()
            if ours.cfg.vision is not None:
                hf.model.rope_deltas = None
            hf.generate(**inputs(), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            times.append(time.perf_counter() - start)
    return times[0], times[1]


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
