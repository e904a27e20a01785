"""deploy/compose.yaml for real: the image `make image` built, on this machine's Docker engine.

In order (one stack for the module): `up --wait` with a tiny model, then image+text chat through
the official openai client; `--scale encoder=2` and both encoders answer Encode calls; one
encoder container SIGKILLed while requests run, none of which fails; `down -v` leaves no
container, volume or network.
"""

from __future__ import annotations

import base64
import io
import threading
import time

import openai
from PIL import Image

from tests.docker.stack import Stack, docker, http_ok

ENCODE_CALLS = "epd_encoder_request_seconds_count"


def png(seed: int) -> str:
    """A distinct small image per seed (the gateway routes each image hash to one encoder)."""
    img = Image.new("RGB", (64, 48), ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256))
    img.putpixel((seed % 64, seed % 48), (255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=60)


def ask(c: openai.OpenAI, model: str, seed: int) -> openai.types.chat.ChatCompletion:
    return c.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": png(seed)}},
                    {"type": "text", "text": "What is in this image?"},
                ],
            }
        ],
        max_tokens=6,
    )


def encode_calls(stack: Stack) -> dict[str, float]:
    return {c: stack.metric(c, ENCODE_CALLS) for c in stack.containers("encoder")}


def test_up_and_chat_with_images(stack: Stack) -> None:
    start = time.monotonic()
    stack.compose("up", "--detach", "--wait", "--wait-timeout", "240", timeout=300)
    print(f"compose up --wait: {time.monotonic() - start:.1f} s")
    assert http_ok(stack.base_url.removesuffix("/v1") + "/health")
    c = client(stack)
    model = c.models.list().data[0].id
    text_only = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is in this image?"}], max_tokens=6
    )
    reply = ask(c, model, seed=0)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and text_only.usage is not None
    # The image's tokens reached the language service: 64x48 -> 64x64 after resizing, 4 tokens.
    assert reply.usage.prompt_tokens > text_only.usage.prompt_tokens
    assert sum(encode_calls(stack).values()) >= 1


def test_scale_encoders_both_serve(stack: Stack) -> None:
    stack.compose("up", "--detach", "--wait", "--wait-timeout", "240", "--scale", "encoder=2",
                  timeout=300)  # fmt: skip
    encoders = stack.containers("encoder")
    assert len(encoders) == 2, encoders
    before = encode_calls(stack)
    c = client(stack)
    model = c.models.list().data[0].id
    # The gateway re-resolves dns:///encoder every 2 s and ranks encoders per image hash, so
    # distinct images soon reach both.
    deadline = time.monotonic() + 60
    seed = 1000
    served: dict[str, float] = {}
    while time.monotonic() < deadline:
        for _ in range(8):
            ask(c, model, seed)
            seed += 1
        served = {e: n - before.get(e, 0.0) for e, n in encode_calls(stack).items()}
        if len(served) == 2 and all(n > 0 for n in served.values()):
            break
    print(f"Encode calls per encoder after scaling: {served}")
    assert len(served) == 2 and all(n > 0 for n in served.values()), served


def test_kill_an_encoder_under_load_fails_no_request(stack: Stack) -> None:
    encoders = stack.containers("encoder")
    assert len(encoders) == 2, encoders
    victim = encoders[-1]
    c = client(stack)
    model = c.models.list().data[0].id
    failures: list[str] = []
    done: list[float] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        seed = 10_000 * (worker + 1)
        while not stop.is_set():
            start = time.monotonic()
            try:
                reply = ask(c, model, seed)
                assert reply.choices[0].finish_reason in ("stop", "length"), reply
                done.append(time.monotonic() - start)
            except Exception as e:
                failures.append(f"seed {seed}: {type(e).__name__}: {e}")
            seed += 1

    workers = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    try:
        time.sleep(4)
        before_kill = len(done)
        docker("kill", "--signal", "KILL", victim)
        time.sleep(10)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=90)
    retries = stack.metric(stack.containers("gateway")[0], "epd_gateway_encoder_retries_total")
    print(f"{len(done)} requests ({before_kill} before the kill), {len(failures)} failed, "
          f"{retries:.0f} Encode calls retried on the other encoder")  # fmt: skip
    assert before_kill > 0 and len(done) > before_kill
    assert not failures, failures[:5]


def test_down_removes_everything(stack: Stack) -> None:
    assert stack.leftovers()  # the stack is still there before `down`
    stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "30", timeout=180)
    assert stack.leftovers() == []
