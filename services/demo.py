"""`epd demo`: start the stack, ask one question about an image with the OpenAI client, stop.

What `make demo` runs. The answer is printed with where the time went: preprocess (decode, resize,
patchify on an encoder), encode (the rest of the Encode call: batching, the vision tower,
publishing, the RPC), transfer (the language service pulling the embeddings), prefill and decode
(language service), and the client's end-to-end time.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import time
from pathlib import Path

from services.up import StackConfig, running_stack


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--image", required=True, help="image file to ask about")
    parser.add_argument("--prompt", default="Describe this image.")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--encoders", type=int, default=1)


def run(args: argparse.Namespace) -> int:
    from openai import OpenAI

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP call otherwise
    logging.getLogger("httpx2").setLevel(logging.WARNING)

    image = Path(args.image)
    mime = "image/png" if image.suffix.lower() == ".png" else "image/jpeg"
    url = f"data:{mime};base64,{base64.b64encode(image.read_bytes()).decode()}"
    print(
        f"starting {args.encoders} encoder(s), a language service and the gateway ...", flush=True
    )
    with running_stack(StackConfig(model=args.model, encoders=args.encoders, http_port=0)) as stack:
        client = OpenAI(base_url=stack.base_url, api_key="unused")
        name = client.models.list().data[0].id
        started = time.perf_counter()
        raw = client.chat.completions.with_raw_response.create(
            model=name,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": args.prompt},
                    ],
                }
            ],
            max_tokens=args.max_tokens,
            temperature=0,
        )
        elapsed = time.perf_counter() - started
        reply = raw.parse()
        timings = json.loads(raw.headers.get("x-epd-timings", "{}"))
    choice = reply.choices[0]
    print(f"\nQ: {args.prompt} [{image.name}]")
    print(f"A: {choice.message.content!r}")
    u = reply.usage
    assert u is not None  # the gateway always reports usage
    print(
        f"\n{u.prompt_tokens} prompt tokens, {u.completion_tokens} generated "
        f"(finish: {choice.finish_reason})"
    )
    for stage in ("preprocess", "encode", "transfer", "prefill", "decode"):
        print(f"  {stage:<9}{timings.get(stage, 0.0) * 1000:9.1f} ms")
    print(f"  {'total':<9}{elapsed * 1000:9.1f} ms (client, end to end)")
    return 0 if choice.finish_reason in ("stop", "length") else 1
