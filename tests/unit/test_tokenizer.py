"""Our tokenizer/chat-template path gives transformers' exact prompt ids and text."""

from __future__ import annotations

import pytest
import transformers as tf

from common.tokenizer import ChatTokenizer

MESSAGES = [
    [{"role": "user", "content": "Hello there!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A fox."},
        {"role": "user", "content": [{"type": "text", "text": "Sure? "}, {"type": "image"}]},
    ],
]


@pytest.mark.parametrize("messages", MESSAGES)
def test_render_and_encode_match_transformers(tiny_model, messages):
    ours = ChatTokenizer(tiny_model)
    ref = tf.AutoTokenizer.from_pretrained(tiny_model)
    text = ours.render(messages)
    assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"]


def test_decode_matches_transformers_and_eos_comes_from_generation_config(tiny_model):
    ours = ChatTokenizer(tiny_model)
    ref = tf.AutoTokenizer.from_pretrained(tiny_model)
    ids = ours.encode("<|im_start|>assistant\nThe quick brown fox, 42 times. ünïcode<|im_end|>")
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert ours.eos_token_ids == (ours.token_id("<|im_end|>"), ours.token_id("<|endoftext|>"))


def test_missing_tokenizer_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        ChatTokenizer(tmp_path)
