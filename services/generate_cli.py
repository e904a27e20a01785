"""`epd generate`: run the whole model in this process on images and a prompt, through the
serving engine (the language service's engine flags apply)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.contract import SamplingParams
from services.colocated import ColocatedPipeline
from services.language.engine.builder import add_engine_arguments, engine_config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (Hugging Face format)")
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="image file; repeat for several (they precede the prompt, in order)",
    )
    parser.add_argument("--prompt", required=True, help="the user's text")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    parser.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence")
    add_engine_arguments(parser)
    parser.add_argument(
        "--json",
        action="store_true",
        help='print one JSON object {"token_ids": [...], "text": "..."}',
    )


def run(args: argparse.Namespace) -> int:
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            ignore_eos=args.ignore_eos,
        )
        images = [Path(p).read_bytes() for p in args.image]
        engine = engine_config_from_args(args)
        pipeline = ColocatedPipeline(args.model, args.dtype, args.device, engine)
        result = pipeline.generate(images, args.prompt, params)
    except (ValueError, OSError) as e:
        print(f"epd generate: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"token_ids": result.token_ids, "text": result.text}))
        return 0
    print(result.text)
    stages = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in result.timings.items())
    print(
        f"[{result.prompt_tokens} prompt tokens, {len(result.token_ids)} generated, "
        f"finish={result.finish_reason}; {stages}]",
        file=sys.stderr,
    )
    return 0
