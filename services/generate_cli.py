"""`epd generate`: run the whole model in this process on images, videos and a prompt, through
the serving engine (the language service's engine flags apply)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.contract import SamplingParams
from services.colocated import ColocatedPipeline, Media, Part
from services.language.engine.builder import add_engine_arguments, engine_config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (Hugging Face format)")
    parser.add_argument(
        "--image",
        action=_MediaAction,
        dest="media",
        default=[],
        metavar="PATH",
        help="image file; repeat for several (images and videos precede the prompt, in the "
        "order given)",
    )
    parser.add_argument(
        "--video",
        action=_MediaAction,
        dest="media",
        metavar="PATH",
        help="video file (MP4/MOV, WebM/MKV, AVI); repeat for several",
    )
    parser.add_argument("--prompt", required=True, help="the user's text")
    parser.add_argument(
        "--prompt-first", action="store_true", help="the text precedes the images and videos"
    )
    parser.add_argument(
        "--video-fps",
        type=float,
        default=None,
        help="frames sampled per second of video (default: the checkpoint's, 2)",
    )
    parser.add_argument(
        "--video-max-frames",
        type=int,
        default=None,
        help="frames sampled per video at most (default: the checkpoint's, 768)",
    )
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
        media: list[Part] = [Media(kind, Path(p).read_bytes()) for kind, p in args.media]
        parts = [args.prompt, *media] if args.prompt_first else [*media, args.prompt]
        engine = engine_config_from_args(args)
        pipeline = ColocatedPipeline(args.model, args.dtype, args.device, engine)
        sampling = None
        if any(kind == "video" for kind, _ in args.media):
            sampling = pipeline.video_cfg.sampling(args.video_fps, args.video_max_frames)
        try:
            result = pipeline.generate_parts(parts, params, sampling)
        finally:
            pipeline.close()
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


class _MediaAction(argparse.Action):
    """`--image` and `--video` append ("image" | "video", path) to one list, in command-line
    order."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        kind = "video" if option_string == "--video" else "image"
        getattr(namespace, self.dest).append((kind, values))
