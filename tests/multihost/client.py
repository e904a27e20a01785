"""The client host's side of tests/multihost (run inside its network namespace by cluster.py);
prints one JSON line.

    python -m tests.multihost.client chat BASE_URL N SEED CONCURRENCY TIMEOUT_S
        N image+text chats through the official openai client, distinct images (seeds SEED..),
        CONCURRENCY at a time, each with TIMEOUT_S as its deadline and no retries:
        [{"seed", "ok", "seconds", "error"?}, ...]
    python -m tests.multihost.client metric URL NAME LABELS_JSON
        the sum of NAME's samples on a Prometheus /metrics page whose labels include LABELS_JSON
"""

from __future__ import annotations

import base64
import io
import json
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
from PIL import Image


def png(seed: int) -> str:
    """A 256x256 image of its own per seed: 64 image tokens, a distinct content hash."""
    img = Image.new("RGB", (256, 256), ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256))
    for i in range(16):
        img.putpixel(((seed + i * 7) % 256, (seed * 3 + i) % 256), (255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(base_url: str, n: int, seed: int, concurrency: int, timeout_s: float) -> list[Any]:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=timeout_s)
    model = client.models.list().data[0].id

    def one(s: int) -> dict[str, Any]:
        start = time.monotonic()
        try:
            reply = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": png(s)}},
                    {"type": "text", "text": "What is in this image?"},
                ]}],
                max_tokens=4,
            )  # fmt: skip
            ok = reply.choices[0].finish_reason in ("stop", "length")
            return {"seed": s, "ok": ok, "seconds": time.monotonic() - start}
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            return {"seed": s, "ok": False, "seconds": time.monotonic() - start, "error": error}

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(seed, seed + n)))


def metric(url: str, name: str, labels: dict[str, str]) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series != name and not series.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


def main(argv: list[str]) -> None:
    if argv[0] == "chat":
        out: Any = chat(argv[1], int(argv[2]), int(argv[3]), int(argv[4]), float(argv[5]))
    elif argv[0] == "metric":
        out = metric(argv[1], argv[2], json.loads(argv[3]))
    else:
        raise SystemExit(__doc__)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
