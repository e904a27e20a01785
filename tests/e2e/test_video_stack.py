"""Videos through the whole system as users run it: `epd up`'s processes on loopback (two
encoders; long videos cut into chunks across them), the official OpenAI client and gRPC Chat,
against transformers' own processor and model; and `epd generate --video`."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest

from bench.media import synthetic_audio
from common.rpc import gateway_pb2, gateway_pb2_grpc
from services.colocated import Media
from services.up import StackConfig, running_stack

EPD = str(Path(sys.executable).parent / "epd")
SHORT = (64, 48, 40, 10, 1)
ODD = (80, 64, 45, 10, 2)
LONG = (64, 64, 120, 10, 3)  # 12 temporal patches of 16 patches: 2 chunks of <= 100 patches


@pytest.fixture(scope="module")
def stack(tiny_model, tmp_path_factory):
    media = tmp_path_factory.mktemp("video-media")
    cfg = StackConfig(
        model=str(tiny_model),
        encoders=2,
        http_port=0,
        kv_cache_bytes=16 << 20,
        extra_encoder_args=("--metrics-port", "0"),
        extra_gateway_args=(
            "--allowed-local-media-path", str(media), "--video-chunk-patches", "100",
            "--max-video-bytes", "400000", "--max-video-seconds", "30",
            "--max-video-frames", "600",
        ),
    )  # fmt: skip
    with running_stack(cfg, timeout=180) as s:
        s.media = media  # type: ignore[attr-defined]
        yield s


def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key="none", max_retries=0, timeout=120)


def url(part: Media) -> str:
    mime = "video/mp4" if part.kind == "video" else "image/png"
    return f"data:{mime};base64," + base64.b64encode(part.data).decode()


def openai_content(parts) -> list[dict]:
    out = []
    for p in parts:
        if isinstance(p, str):
            out.append({"type": "text", "text": p})
        else:
            key = f"{p.kind}_url"
            out.append({"type": key, key: {"url": url(p)}})
    return out


def expected(oracle, model_dir, parts, n=16, **kw) -> str:
    hf = oracle(model_dir)
    ids = hf.generate(hf.parts_inputs(parts, **kw), n)
    if ids and ids[-1] in set(hf.model.generation_config.eos_token_id):
        ids = ids[:-1]
    return hf.tokenizer.decode(ids, skip_special_tokens=True)


def encoder_video_tokens(stack) -> list[float]:
    out = []
    for enc in stack.role("encoder"):
        port = next(int(x.rsplit(":", 1)[1]) for x in enc.log_path.read_text().splitlines()
                    if "metrics on :" in x)  # fmt: skip
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
            lines = r.read().decode().splitlines()
        out.append(sum(float(x.split()[-1]) for x in lines
                       if x.startswith("epd_encoder_video_tokens_total")))  # fmt: skip
    return out


def cases(video, png):
    return {
        "video+text": [Media("video", video(*SHORT)), "Describe this video."],
        "video+image+text": [
            Media("video", video(*ODD)),
            Media("image", png(96, 64, 4)),
            "What changes between them?",
        ],
        "text-before-video": ["Watch this:", Media("video", video(*SHORT[:4], 5))],
        "long-video": [Media("video", video(*LONG)), "Summarize."],
    }


@pytest.mark.parametrize(
    "case", ["video+text", "video+image+text", "text-before-video", "long-video"]
)
def test_openai_client_gets_transformers_greedy_text_for_videos(
    stack, tiny_model, oracle, video, png, case
):
    parts = cases(video, png)[case]
    want = expected(oracle, tiny_model, parts)
    hf = oracle(tiny_model)
    prompt_tokens = hf.parts_inputs(parts)["input_ids"].shape[1]
    c = client(stack)
    name = c.models.list().data[0].id
    messages = [{"role": "user", "content": openai_content(parts)}]
    before = encoder_video_tokens(stack)
    reply = c.chat.completions.create(model=name, messages=messages, max_tokens=16, temperature=0)
    assert reply.choices[0].message.content == want
    assert reply.usage.prompt_tokens == prompt_tokens  # timestamps and pads, as transformers
    gained = [a - b for a, b in zip(encoder_video_tokens(stack), before, strict=True)]
    if case == "long-video":  # two chunks, one on each encoder (cache affinity by chunk)
        assert all(g > 0 for g in gained), gained
    stream = c.chat.completions.create(
        model=name, messages=messages, max_tokens=16, temperature=0, stream=True
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == want


def test_mm_processor_kwargs_and_file_urls(stack, tiny_model, oracle, video):
    data = video(*LONG)
    (stack.media / "clip.mp4").write_bytes(data)
    parts = [Media("video", data), "Describe."]
    want = expected(oracle, tiny_model, parts, fps=4.0, max_frames=6)
    c = client(stack)
    content = [{"type": "video_url", "video_url": {"url": f"file://{stack.media}/clip.mp4"}},
               {"type": "text", "text": "Describe."}]  # fmt: skip
    reply = c.chat.completions.create(
        model=c.models.list().data[0].id, messages=[{"role": "user", "content": content}],
        max_tokens=16, temperature=0,
        extra_body={"mm_processor_kwargs": {"fps": 4.0, "max_frames": 6}},
    )  # fmt: skip
    assert reply.choices[0].message.content == want


def test_grpc_chat_carries_video_bytes(stack, tiny_model, oracle, video):
    data = video(*SHORT)
    want = expected(oracle, tiny_model, [Media("video", data), "Describe this video."], 12)
    request = gateway_pb2.ChatRequest(
        messages=[gateway_pb2.Message(role="user", content=[
            gateway_pb2.Part(video=data), gateway_pb2.Part(text="Describe this video.")])],
        max_tokens=12, temperature=0.0,
    )  # fmt: skip
    with grpc.insecure_channel(stack.gateway_grpc) as channel:
        replies = list(gateway_pb2_grpc.ChatStub(channel).Complete(request))
    assert "".join(r.delta.text for r in replies if r.HasField("delta")) == want


def post(stack, body):
    req = urllib.request.Request(
        f"{stack.base_url}/chat/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_videos_get_400_with_the_reason_and_the_stack_serves_on(stack, video):
    name = client(stack).models.list().data[0].id
    good = video(*SHORT)
    cases = [
        (good[:400], 400, "cannot read the video"),
        (video(256, 256, 40, 10, 9, "ffv1", "matroska"), 413, "--max-video-bytes"),
        (video(32, 32, 31, 1, 1), 400, "--max-video-seconds"),
        (video(32, 32, 610, 30, 1), 400, "--max-video-frames"),
        (synthetic_audio(), 400, "no video stream (audio streams only)"),
        (video(64, 48, 0, codec="mpeg4", container="avi"), 400, "no frames"),
        (video(64, 48, 1), 400, "at least 2 are needed"),
    ]
    for data, status, reason in cases:
        content = [{"type": "video_url", "video_url": {"url": url(Media("video", data))}}]
        code, reply = post(stack, {"model": name, "messages": [{"role": "user",
                                                                 "content": content}]})  # fmt: skip
        assert code == status, (reason, reply)
        assert reason in reply["error"]["message"], reply
    code, reply = post(stack, {"model": name, "mm_processor_kwargs": {"fps": 0},
                               "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert code == 400 and reply["error"]["param"] == "mm_processor_kwargs"
    content = [{"type": "video_url", "video_url": {"url": url(Media("video", good))}},
               {"type": "text", "text": "ok?"}]  # fmt: skip
    code, reply = post(stack, {"model": name, "max_tokens": 2,
                               "messages": [{"role": "user", "content": content}]})  # fmt: skip
    assert code == 200 and reply["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("case", ["video+image+text", "text-before-video", "long-video"])
def test_epd_generate_video_matches_transformers(tiny_model, oracle, video, png, tmp_path, case):
    parts = cases(video, png)[case]
    args, prompt = [], ""
    for i, p in enumerate(parts):
        if isinstance(p, str):
            prompt = p
            continue
        path = tmp_path / f"{i}.{'mp4' if p.kind == 'video' else 'png'}"
        path.write_bytes(p.data)
        args += [f"--{p.kind}", str(path)]
    if isinstance(parts[0], str):
        args.append("--prompt-first")
    out = subprocess.run(
        [EPD, "generate", "--model", str(tiny_model), *args, "--prompt", prompt,
         "--max-tokens", "16", "--json"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    hf = oracle(tiny_model)
    assert json.loads(out.stdout)["token_ids"] == hf.generate(hf.parts_inputs(parts), 16)
