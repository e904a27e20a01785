"""Gateway text handling: incremental detokenization, stop strings, request validation, media."""

from __future__ import annotations

import base64
import random

import pytest

from common.tokenizer import ChatTokenizer
from services.gateway.detokenizer import IncrementalDetokenizer
from services.gateway.media import MediaError, load_image_url
from services.gateway.openai_protocol import ApiError, Limits, parse_chat_request

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 32).decode()


@pytest.mark.parametrize("seed", range(5))
def test_stream_deltas_concatenate_to_the_full_decode(tiny_model, seed):
    tok = ChatTokenizer(tiny_model)
    rng = random.Random(seed)
    # Text with multi-byte characters, so byte-level tokens split characters.
    ids = tok.encode("héllo wörld — ünïcode ✓ 日本語 " * 3) + [
        rng.randrange(400) for _ in range(40)
    ]
    detok = IncrementalDetokenizer(tok)
    deltas = []
    for tid in ids:
        delta = detok.add([tid])
        assert "\ufffd" not in delta[-1:] or not delta  # never ends on a split character
        deltas.append(delta)
    deltas.append(detok.finish())
    assert "".join(deltas) == tok.decode(ids)


def test_each_step_decodes_a_short_window_not_the_whole_output(tiny_model):
    tok = ChatTokenizer(tiny_model)
    ids = tok.encode("A long answer — with ünïcode ✓ and 日本語 in it. " * 60)
    assert len(ids) > 2000
    sizes: list[int] = []
    decode = tok.decode

    def counting_decode(token_ids, skip_special_tokens=True):  # type: ignore[no-untyped-def]
        sizes.append(len(token_ids))
        return decode(token_ids, skip_special_tokens=skip_special_tokens)

    tok.decode = counting_decode  # type: ignore[method-assign]
    detok = IncrementalDetokenizer(tok, stop=["never appears"])
    out = "".join(detok.add([tid]) for tid in ids) + detok.finish()
    tok.decode = decode  # type: ignore[method-assign]
    assert out == decode(ids)
    # A window is the previous step's tokens plus the new one, longer only while a character
    # is split across tokens (at most 4 UTF-8 bytes).
    assert max(sizes) <= 8, max(sizes)


def test_stop_string_found_across_many_steps(tiny_model):
    tok = ChatTokenizer(tiny_model)
    text = "alpha beta " * 40 + "gamma STOP delta " + "epsilon " * 10
    detok = IncrementalDetokenizer(tok, stop=["gamma STOP"])
    out = ""
    for tid in tok.encode(text):
        out += detok.add([tid])
        if detok.stopped:
            break
    out += detok.finish()
    assert out == "alpha beta " * 40 and detok.stopped


def test_stop_string_truncates_and_is_never_streamed(tiny_model):
    tok = ChatTokenizer(tiny_model)
    ids = tok.encode("The quick brown fox jumps over the lazy dog.")
    detok = IncrementalDetokenizer(tok, stop=["fox jumps", "never"])
    out = ""
    for tid in ids:
        out += detok.add([tid])
        if detok.stopped:
            break
    out += detok.finish()
    assert out == "The quick brown " and detok.stopped
    assert "fox" not in out


def body(**kw):
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    base.update(kw)
    return base


@pytest.mark.parametrize(
    ("request_body", "param", "status"),
    [
        ({"messages": []}, "messages", 400),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0]", 400),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
         "messages[0].content[0]", 400),
        ({"temperature": 3}, "temperature", 400),
        ({"temperature": -1}, "temperature", 400),
        ({"top_p": 0}, "top_p", 400),
        ({"max_tokens": 0}, "max_tokens", 400),
        ({"n": 2}, "n", 400),
        ({"top_logprobs": 3}, "top_logprobs", 400),
        ({"stop": 5}, "stop", 400),
    ],
)  # fmt: skip
def test_bad_requests_name_the_parameter(request_body, param, status):
    with pytest.raises(ApiError) as err:
        parse_chat_request(body(**request_body), Limits())
    assert err.value.status == status and err.value.param == param


def test_parts_in_any_order_and_image_limits(tmp_path):
    url = f"data:image/png;base64,{PNG}"
    req = parse_chat_request(
        body(messages=[{"role": "user", "content": [
            {"type": "text", "text": "before"},
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "after"},
        ]}], max_completion_tokens=7, stream=True, stream_options={"include_usage": True}),
        Limits(),
    )  # fmt: skip
    assert [p["type"] for p in req.messages[0]["content"]] == ["text", "image", "text"]
    assert len(req.images) == 1 and req.max_tokens == 7 and req.include_usage
    many = [{"type": "image_url", "image_url": {"url": url}}] * 3
    with pytest.raises(ApiError, match="too many images"):
        parse_chat_request(body(messages=[{"role": "user", "content": many}]), Limits(max_images=2))
    with pytest.raises(ApiError) as err:
        parse_chat_request(
            body(messages=[{"role": "user", "content": many[:1]}]), Limits(max_image_bytes=10)
        )
    assert err.value.status == 413


def test_media_urls(tmp_path):
    with pytest.raises(MediaError, match="not an image"):
        load_image_url("data:text/plain;base64,aGVsbG8=", None, 1 << 20)
    with pytest.raises(MediaError, match="not valid base64"):
        load_image_url("data:image/png;base64,@@@", None, 1 << 20)
    with pytest.raises(MediaError, match="not a PNG"):
        load_image_url("data:image/png;base64,aGVsbG8=", None, 1 << 20)
    with pytest.raises(MediaError, match="remote image URLs"):
        load_image_url("https://example.com/a.png", None, 1 << 20)
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "ok.png").write_bytes(base64.b64decode(PNG))
    (tmp_path / "secret.png").write_bytes(base64.b64decode(PNG))
    assert load_image_url(f"file://{allowed}/ok.png", allowed, 1 << 20)
    with pytest.raises(MediaError, match="outside the allowed directory"):
        load_image_url(f"file://{allowed}/../secret.png", allowed, 1 << 20)
    with pytest.raises(MediaError, match="disabled"):
        load_image_url(f"file://{allowed}/ok.png", None, 1 << 20)
