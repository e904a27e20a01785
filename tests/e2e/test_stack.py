"""The whole system as users run it: `epd up`'s processes on loopback and the official OpenAI
client."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest

from common.grpc_bootstrap import health_check
from common.rpc import gateway_pb2, gateway_pb2_grpc
from services.gateway.backends import rendezvous_weight
from services.gateway.media import content_hash
from services.up import StackConfig, running_stack

EPD = str(Path(sys.executable).parent / "epd")
KEY = "test-key"
PROMPT = "What is in this picture?"


@pytest.fixture(scope="module")
def stack(tiny_model, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    cfg = StackConfig(
        model=str(tiny_model),
        encoders=2,
        http_port=0,
        api_key=KEY,
        kv_cache_bytes=16 << 20,
        extra_encoder_args=("--metrics-port", "0", "--max-image-pixels", "4000000"),
        extra_language_args=("--metrics-port", "0"),
        extra_gateway_args=(
            "--allowed-local-media-path",
            str(media),
            "--max-images-per-request",
            "3",
            "--max-image-bytes",
            "2000000",
            "--encode-timeout",
            "3",
        ),
    )
    with running_stack(cfg, timeout=180) as s:
        s.media = media  # type: ignore[attr-defined]
        yield s


def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=KEY, max_retries=0, timeout=60)


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_messages(images: list[bytes], text: str = PROMPT) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(b)}} for b in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def expected_text(oracle, model_dir, images, text, n):
    hf = oracle(model_dir)
    ids = hf.generate(hf.inputs(images, text), n)
    eos = set(hf.model.generation_config.eos_token_id)
    if ids and ids[-1] in eos:
        ids = ids[:-1]
    return hf.tokenizer.decode(ids, skip_special_tokens=True)


def model_name(stack) -> str:
    return client(stack).models.list().data[0].id


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_openai_client_gets_transformers_greedy_text(stack, tiny_model, oracle, png, n_images):
    images = [png(150, 100, 30 + i) for i in range(n_images)]
    want = expected_text(oracle, tiny_model, images, PROMPT, 16)
    c = client(stack)
    messages = image_messages(images) if images else [{"role": "user", "content": PROMPT}]
    reply = c.chat.completions.create(
        model=model_name(stack), messages=messages, max_tokens=16, temperature=0
    )
    assert reply.choices[0].message.content == want
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0
    stream = c.chat.completions.create(
        model=model_name(stack),
        messages=messages,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == want
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_grpc_chat_gives_the_same_text(stack, tiny_model, oracle, png):
    image = png(120, 90, 40)
    want = expected_text(oracle, tiny_model, [image], PROMPT, 12)
    request = gateway_pb2.ChatRequest(
        messages=[
            gateway_pb2.Message(
                role="user", content=[gateway_pb2.Part(image=image), gateway_pb2.Part(text=PROMPT)]
            )
        ],
        max_tokens=12,
        temperature=0.0,
    )
    with grpc.insecure_channel(stack.gateway_grpc) as channel:
        stub = gateway_pb2_grpc.ChatStub(channel)
        replies = list(stub.Complete(request, metadata=[("authorization", f"Bearer {KEY}")]))
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Complete(request))
    assert "".join(r.delta.text for r in replies if r.HasField("delta")) == want
    assert replies[-1].done.completion_tokens > 0
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_bench_compares_with_the_colocated_pipeline_in_turns(stack, tiny_model):
    """`epd bench --compare-colocated` at concurrency 1: the gateway and the in-process pipeline
    answer the same requests in turns; both report every request, none failed."""
    out = subprocess.run(
        [EPD, "bench", "--url", stack.base_url, "--api-key", KEY, "--compare-colocated",
         "--model-dir", str(tiny_model), "--requests", "4", "--output-tokens", "3",
         "--image-size", "64x48", "--prompt-words", "4", "--json"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    reports = json.loads(out.stdout.strip().splitlines()[-1])["reports"]
    assert [r["system"] for r in reports] == ["epd", "colocated"]
    for r in reports:
        assert r["requests"] == 4 and r["errors"] == {} and r["concurrency"] == 1
        assert r["output_tok_s"] > 0 and 0 < r["ttft_s"]["p50"] <= r["e2e_s"]["p50"]


def test_bench_against_a_second_stack_interleaves_the_same_requests(stack, tiny_model):
    """`epd bench --start-stack --against URL`: the same requests on a stack started here and on
    this module's stack, every workload and level, in passes whose system order rotates."""
    out = subprocess.run(
        [EPD, "bench", "--start-stack", "--model-dir", str(tiny_model), "--api-key", KEY,
         "--against", f"other={stack.base_url}", "--workloads", "image,text",
         "--concurrency", "1,2", "--requests", "2", "--warmup", "1", "--passes", "2",
         "--output-tokens", "3", "--image-size", "64x48", "--prompt-words", "4", "--json"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    report = json.loads(out.stdout.strip().splitlines()[-1])
    cells = [("image", 1), ("image", 2), ("text", 1), ("text", 2)]
    rows = report["rows"]
    assert [(r["workload"], r["concurrency"], r["system"]) for r in rows] == [
        (w, c, s) for w, c in cells for s in ("epd", "other")
    ]
    for r in rows:
        assert r["requests"] == 4 and r["passes"] == 2 and r["errors"] == {}
        assert r["output_tokens_avg"] == 3 and r["output_tok_s"] > 0
        assert 0 < r["ttft_s"]["p50"] <= r["ttft_s"]["p99"] and r["tpot_s"]["p50"] > 0
    for a, b in zip(rows[::2], rows[1::2], strict=True):  # same checkpoint, same requests
        assert a["prompt_tokens_avg"] == b["prompt_tokens_avg"]
    image, text = rows[0]["prompt_tokens_avg"], rows[4]["prompt_tokens_avg"]
    assert image > text  # the image's pad tokens
    order = [(r["pass_no"], r["system"]) for r in report["passes"]]
    assert order[:2] == [(0, "epd"), (0, "other")] and order[8:10] == [(1, "other"), (1, "epd")]
    assert [q["systems"] for q in report["ratios"]] == ["epd/other"] * 4
    assert all(len(q["output_tok_s_per_pass"]) == 2 for q in report["ratios"])


def encoder_metric(stack, name: str) -> list[float]:
    return role_metric(stack, "encoder", name)


def role_metric(stack, role: str, name: str) -> list[float]:
    values = []
    for enc in stack.role(role):
        port = metrics_port(enc)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
            text = r.read().decode()
        values.append(
            sum(
                float(line.split()[-1])
                for line in text.splitlines()
                if line.startswith(name) and not line.startswith("#")
            )
        )
    return values


def metrics_port(enc) -> int:
    for line in enc.log_path.read_text().splitlines():
        if "metrics on :" in line:
            return int(line.rsplit(":", 1)[1])
    raise AssertionError(f"no metrics port in {enc.log_path}")


def test_torch_roles_spin_briefly_and_the_gateway_is_left_alone(stack):
    def environ(child) -> dict[str, str]:
        raw = Path(f"/proc/{child.proc.pid}/environ").read_bytes().split(b"\0")
        return dict(e.decode().split("=", 1) for e in raw if b"=" in e)

    policies = {c.role: environ(c).get("GOMP_SPINCOUNT") for c in stack.children}
    assert policies == {"encoder": "100000", "language": "100000", "gateway": None}
    assert not any("OMP_WAIT_POLICY" in environ(c) for c in stack.children)


def test_repeated_image_lands_on_the_same_encoder_and_hits_its_cache(stack, png):
    image = png(100, 100, 77)
    before = encoder_metric(stack, "epd_encoder_cache_hits_total")
    c = client(stack)
    for _ in range(3):
        c.chat.completions.create(
            model=model_name(stack), messages=image_messages([image]), max_tokens=2, temperature=0
        )
    gained = [a - b for a, b in zip(encoder_metric(stack, "epd_encoder_cache_hits_total"), before,
                                     strict=True)]  # fmt: skip
    assert sorted(gained) == [0, 2]  # one encoder saw it three times: 1 miss, 2 hits


def post(stack, body, key=KEY, raw: bytes | None = None):
    req = urllib.request.Request(
        f"{stack.base_url}/chat/completions",
        data=raw if raw is not None else json.dumps(body).encode(),
        headers={
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {key}"} if key else {}),
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_inputs_get_openai_errors_and_the_stack_stays_healthy(stack, png):
    name = model_name(stack)
    (stack.media / "ok.png").write_bytes(png(64, 64, 1))
    outside = stack.media.parent / "outside.png"
    outside.write_bytes(png(64, 64, 2))
    corrupt = png(64, 64, 3)[:60]  # a PNG header, then nothing decodable
    big = png(1200, 1200, 4)  # over the gateway's 2 MB byte limit

    def msg(*parts):
        return [{"role": "user", "content": list(parts)}]

    def img(url):
        return {"type": "image_url", "image_url": {"url": url}}

    cases = [
        (None, b"{not json", 400, "not valid JSON"),
        ({"model": name}, None, 400, "messages"),
        ({"model": name, "messages": msg({"type": "audio_url", "audio_url": {}})}, None, 400,
         "unsupported content part"),
        ({"model": name, "messages": msg(img("data:text/plain;base64,aGk="))}, None, 400,
         "not an image"),
        ({"model": name, "messages": msg(img(data_url(corrupt)))}, None, 400, "image 0"),
        ({"model": name, "messages": msg(img(f"file://{outside}"))}, None, 400,
         "outside the allowed directory"),
        ({"model": name, "messages": msg(*[img(f"file://{stack.media}/ok.png")] * 4)}, None, 400,
         "too many images"),
        ({"model": name, "messages": msg(img(data_url(big)))}, None, 413, "over the limit"),
        ({"model": name, "messages": msg({"type": "text", "text": "hi"}), "temperature": 7},
         None, 400, "temperature"),
        ({"model": "nope", "messages": msg({"type": "text", "text": "hi"})}, None, 404, "nope"),
    ]  # fmt: skip
    for body, raw, status, text in cases:
        code, reply = post(stack, body, raw=raw)
        assert code == status, (text, reply)
        assert text in reply["error"]["message"] and reply["error"]["type"]
    ok_parts = msg(img(f"file://{stack.media}/ok.png"), {"type": "text", "text": "hi"})
    ok_body = {"model": name, "messages": ok_parts, "max_tokens": 2}
    assert post(stack, ok_body, key="wrong")[0] == 401
    assert post(stack, ok_body, key=None)[0] == 401
    code, reply = post(stack, ok_body)
    assert code == 200 and reply["choices"][0]["finish_reason"] in ("stop", "length")
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.http_port}/health") as r:
        assert r.status == 200  # /health needs no key


def test_frozen_encoder_costs_at_most_the_deadline(stack, png):
    """SIGSTOP the encoder an image ranks first on: the gateway retries on the other one after
    its 3 s encode deadline, and the request still succeeds."""
    c = client(stack)
    name = model_name(stack)
    frozen, other = stack.role("encoder")
    image = next(
        img
        for img in (png(90, 70, 300 + i) for i in range(64))
        if rendezvous_weight(content_hash(img), frozen.grpc_address)
        > rendezvous_weight(content_hash(img), other.grpc_address)
    )
    retries = gateway_metric(stack, "epd_gateway_encoder_retries_total")
    os.kill(frozen.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        reply = c.chat.completions.create(
            model=name, messages=image_messages([image]), max_tokens=2
        )
        elapsed = time.monotonic() - started
    finally:
        os.kill(frozen.proc.pid, signal.SIGCONT)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert 3.0 <= elapsed < 3.0 + 2.0
    assert gateway_metric(stack, "epd_gateway_encoder_retries_total") == retries + 1
    wait_until_healthy(stack)


def gateway_metric(stack, name: str) -> float:
    req = urllib.request.Request(
        f"http://127.0.0.1:{stack.http_port}/metrics", headers={"Authorization": f"Bearer {KEY}"}
    )
    with urllib.request.urlopen(req) as r:
        lines = r.read().decode().splitlines()
    return sum(float(x.split()[-1]) for x in lines if x.startswith(name))


def wait_until_healthy(stack, timeout: float = 10.0) -> None:
    """Both encoders back in the gateway's pool (its health checks run every 2 s)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(health_check(e.grpc_address) == "SERVING" for e in stack.role("encoder")):
            time.sleep(2.5)
            return
        time.sleep(0.2)
    raise AssertionError("encoders did not recover")


def serving(address: str) -> bool:
    try:
        return health_check(address, timeout=2.0) == "SERVING"
    except grpc.RpcError:  # not listening (yet)
        return False


def test_killing_encoders_under_load_fails_no_request_and_spares_the_language_replica(
    tiny_model, png
):
    """Three encoders on the grpc transport, ONE language replica, image requests six at a time;
    two encoders are SIGKILLed in turn. Each kill lands while the language replica is paused
    (as a long step or a GC pause would hold it) and hits an encoder holding tensors that were
    published and not yet pulled. Those images are encoded again elsewhere: no request fails,
    the language replica is never marked down (it was never at fault), and `epd up` restarts the
    dead encoders."""
    cfg = StackConfig(model=str(tiny_model), encoders=3, transport="grpc", http_port=0,
                      kv_cache_bytes=16 << 20, api_key=KEY,
                      extra_encoder_args=("--metrics-port", "0"))  # fmt: skip
    with running_stack(cfg, timeout=180) as s:
        c = client(s)
        name = model_name(s)
        images = [png(80, 60, 500 + i) for i in range(150 + 6)]
        encoders = s.role("encoder")
        ports = {e.name: metrics_port(e) for e in encoders}

        def one(i: int) -> str:
            r = c.chat.completions.create(
                model=name, messages=image_messages([images[i]]), max_tokens=4, temperature=0
            )
            return str(r.choices[0].finish_reason)

        def holding(e) -> bool:  # published tensors not yet pulled
            url = f"http://127.0.0.1:{ports[e.name]}/metrics"
            with urllib.request.urlopen(url, timeout=5) as r:
                lines = r.read().decode().splitlines()
            return any(x.startswith("epd_encoder_pool_bytes_in_use ") and float(x.split()[1])
                       for x in lines)  # fmt: skip

        victims: list = []
        language = s.role("language")[0].proc
        with (
            concurrent.futures.ThreadPoolExecutor(6) as pool,
            concurrent.futures.ThreadPoolExecutor(3) as burst,
        ):
            futures = [pool.submit(one, i) for i in range(150)]
            for k in range(2):
                time.sleep(1.5)
                os.kill(language.pid, signal.SIGSTOP)  # Encode calls go on; Generate calls wait
                try:
                    # New requests arriving now: encoded and published, their pulls pending.
                    futures += [burst.submit(one, 150 + 3 * k + j) for j in range(3)]
                    end = time.monotonic() + 10
                    while not (held := [e for e in encoders if e not in victims and holding(e)]):
                        assert time.monotonic() < end, "no encoder holds an unpulled tensor"
                        time.sleep(0.05)
                    victims.append(held[0])
                    pids = [v.proc.pid for v in victims]
                    held[0].proc.kill()
                finally:
                    os.kill(language.pid, signal.SIGCONT)
            reasons = [f.result() for f in futures]
        image_retries = gateway_metric(s, 'epd_gateway_image_retries_total{reason="producer_lost"}')
        language_down = gateway_metric(s, 'epd_gateway_backends_marked_down_total{pool="language"}')
        end = time.monotonic() + 60
        while not all(v.restarts and serving(v.grpc_address) for v in victims):
            assert time.monotonic() < end, "the killed encoders were not restarted"
            time.sleep(0.5)
        assert [v.proc.pid for v in victims] != pids
        assert one(0) in ("stop", "length")  # and the restarted ones serve
    assert len(reasons) == len(images) and all(r in ("stop", "length") for r in reasons)
    assert image_retries >= 2  # each kill hit tensors published and not yet pulled
    assert language_down == 0


def test_epd_up_prints_endpoints_and_stops_everything_on_ctrl_c(tiny_model):
    proc = subprocess.Popen(
        [EPD, "up", "--model", str(tiny_model), "--http-port", "0", "--kv-cache-bytes", "8000000"],
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C" in line:
                break
        url = next(x.split()[2] for x in lines if x.startswith("OpenAI API:"))
        with urllib.request.urlopen(f"{url}/models", timeout=10) as r:
            assert json.loads(r.read())["data"][0]["id"] == tiny_model.name
        pids = [int(x.split("pid")[1].split()[0]) for x in lines if " pid " in x]
        assert len(pids) == 3  # encoder, language, gateway
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_logprobs_seed_and_stop_strings(stack, tiny_model):
    c = client(stack)
    name = model_name(stack)
    messages = [{"role": "user", "content": "Count to ten."}]
    reply = c.chat.completions.create(
        model=name, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 2
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert e.logprob == e.top_logprobs[0].logprob  # greedy picks the most likely token

    def sampled(seed: int) -> str:
        r = c.chat.completions.create(
            model=name, messages=messages, max_tokens=12, temperature=1.0, seed=seed
        )
        return r.choices[0].message.content

    assert sampled(7) == sampled(7)
    assert len({sampled(s) for s in range(5)}) > 1
    full = (
        c.chat.completions.create(
            model=name,
            messages=messages,
            max_tokens=24,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .message.content
    )
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = c.chat.completions.create(
        model=name,
        messages=messages,
        max_tokens=24,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_client_disconnect_aborts_the_generation_downstream(stack):
    # Earlier tests' requests must have settled first: the stop-string test's downstream abort
    # can land after it returns, and would be counted as this test's.
    running = "epd_language_running_requests"
    end = time.monotonic() + 10
    while role_metric(stack, "language", running) != [0.0] and time.monotonic() < end:
        time.sleep(0.1)
    aborted = role_metric(stack, "language", 'epd_language_requests_total{finish_reason="abort"}')
    c = client(stack)
    stream = c.chat.completions.create(
        model=model_name(stack),
        messages=[{"role": "user", "content": "Go on forever."}],
        max_tokens=4000,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for i, _ in enumerate(stream):
        if i >= 3:
            break
    stream.close()
    end = time.monotonic() + 10
    while time.monotonic() < end:
        now = role_metric(stack, "language", 'epd_language_requests_total{finish_reason="abort"}')
        if now[0] == aborted[0] + 1:
            break
        time.sleep(0.1)
    assert now[0] == aborted[0] + 1
    running = role_metric(stack, "language", "epd_language_running_requests")
    assert running == [0.0]
