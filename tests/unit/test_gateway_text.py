"""Gateway text handling: incremental detokenization, stop strings, request validation, media."""

from __future__ import annotations

import base64
import io
import random

import pytest
from PIL import Image

from common.contract import ImageLimits
from common.tokenizer import ChatTokenizer
from services.gateway.detokenizer import IncrementalDetokenizer
from services.gateway.media import MediaError, load_image_url, read_image
from services.gateway.openai_protocol import ApiError, Limits, parse_chat_request


def png_bytes(w: int = 12, h: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


PNG = base64.b64encode(png_bytes()).decode()
LIMITS = ImageLimits(max_image_bytes=1 << 20)


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
        ({"n": 0}, "n", 400),
        ({"n": 65}, "n", 400),
        ({"n": 2.0}, "n", 400),
        ({"top_logprobs": 3}, "top_logprobs", 400),
        ({"stop": 5}, "stop", 400),
        # Strict types: a string is not a boolean, a float or a bool is not an integer.
        ({"logprobs": "false"}, "logprobs", 400),
        ({"stream": "no"}, "stream", 400),
        ({"stream": 1}, "stream", 400),
        ({"max_tokens": True}, "max_tokens", 400),
        ({"max_tokens": 2.0}, "max_tokens", 400),
        ({"temperature": "0.5"}, "temperature", 400),
        ({"temperature": float("nan")}, "temperature", 400),
        ({"seed": 1 << 70}, "seed", 400),
        ({"top_k": 1.5}, "top_k", 400),
        ({"stop_token_ids": ["1"]}, "stop_token_ids", 400),
        ({"stop_token_ids": [-1]}, "stop_token_ids", 400),
        ({"ignore_eos": "yes"}, "ignore_eos", 400),
        ({"min_tokens": 9, "max_tokens": 3}, "min_tokens", 400),
        ({"stream_options": {"include_usage": True}}, "stream_options", 400),
        ({"stream": True, "stream_options": {"include_usage": "yes"}},
         "stream_options.include_usage", 400),
        # Known to OpenAI or vLLM, not implemented yet: refused, never silently ignored.
        ({"logit_bias": {"5": 10}}, "logit_bias", 400),
        ({"best_of": 2}, "best_of", 400),
        # Implemented, and checked as strictly.
        ({"tools": [{"type": "function", "function": {}}]}, "tools", 400),
        ({"tool_choice": "auto"}, "tool_choice", 400),  # no tools
        ({"response_format": {"type": "json_schema"}}, "response_format", 400),
        ({"guided_regex": 5}, "guided_regex", 400),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0]",
         400),
        ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs", 400),
    ],
)  # fmt: skip
def test_bad_requests_name_the_parameter(request_body, param, status):
    with pytest.raises(ApiError) as err:
        parse_chat_request(body(**request_body), Limits())
    assert err.value.status == status and err.value.param == param, err.value.message


def test_neutral_values_of_unsupported_fields_and_unknown_fields_pass():
    req = parse_chat_request(
        body(tools=[], tool_choice="none", response_format={"type": "text"}, n=1, user="u",
             logit_bias={}, some_future_field={"x": 1}, seed=-1, top_k=-1, max_tokens=5),
        Limits(),
    )  # fmt: skip
    p = req.params
    assert p.max_tokens == 5 and p.top_k == 0 and p.seed == (1 << 64) - 1
    assert parse_chat_request(body(), Limits()).params.max_tokens is None  # up to the context


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
    assert len(req.images) == 1 and req.params.max_tokens == 7 and req.include_usage
    assert (req.images[0].width, req.images[0].height) == (12, 8)  # read from the header
    many = [{"type": "image_url", "image_url": {"url": url}}] * 3
    with pytest.raises(ApiError, match="too many images"):
        parse_chat_request(
            body(messages=[{"role": "user", "content": many}]),
            Limits(ImageLimits(max_images_per_request=2)),
        )
    for limits in (ImageLimits(max_image_bytes=10), ImageLimits(max_image_pixels=12 * 8 - 1)):
        with pytest.raises(ApiError) as err:
            parse_chat_request(body(messages=[{"role": "user", "content": many[:1]}]),
                               Limits(limits))  # fmt: skip
        assert err.value.status == 413


def test_media_urls(tmp_path):
    with pytest.raises(MediaError, match="not an image"):
        load_image_url("data:text/plain;base64,aGVsbG8=", None, LIMITS)
    with pytest.raises(MediaError, match="not valid base64"):
        load_image_url("data:image/png;base64,@@@", None, LIMITS)
    with pytest.raises(MediaError, match="not a PNG"):
        load_image_url("data:image/png;base64,aGVsbG8=", None, LIMITS)
    with pytest.raises(MediaError, match="image header"):
        read_image(b"\x89PNG\r\n\x1a\n" + b"\0" * 32, LIMITS)
    with pytest.raises(MediaError, match="remote image URLs"):
        load_image_url("https://example.com/a.png", None, LIMITS)
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "ok.png").write_bytes(base64.b64decode(PNG))
    (tmp_path / "secret.png").write_bytes(base64.b64decode(PNG))
    assert load_image_url(f"file://{allowed}/ok.png", allowed, LIMITS).width == 12
    with pytest.raises(MediaError, match="outside the allowed directory"):
        load_image_url(f"file://{allowed}/../secret.png", allowed, LIMITS)
    with pytest.raises(MediaError, match="disabled"):
        load_image_url(f"file://{allowed}/ok.png", None, LIMITS)
    with pytest.raises(MediaError, match="cannot read the file URL"):
        load_image_url(f"file://{allowed}/a%00b.png", allowed, LIMITS)
