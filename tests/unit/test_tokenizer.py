"""Our tokenizer/chat-template path gives transformers' exact prompt ids and text."""

from __future__ import annotations

import json

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


def test_every_model_id_decodes_to_text_and_prompts_encode_as_trained(tiny_model):
    """make-tiny-model names every id of the model's vocabulary (decode-only " t<id>" entries
    where BPE training left gaps), so every token a random model emits streams as text; the
    extra entries are never produced by encoding."""
    ours = ChatTokenizer(tiny_model)
    ref = tf.AutoTokenizer.from_pretrained(tiny_model)
    vocab = json.loads((tiny_model / "config.json").read_text())["text_config"]["vocab_size"]
    assert len(ref) == vocab
    texts = [ours.decode([i]) for i in range(vocab)]
    special = set(ref.all_special_ids) | set(ref.added_tokens_decoder)
    assert all(texts[i] for i in range(vocab) if i not in special)
    assert texts == [ref.decode([i], skip_special_tokens=True) for i in range(vocab)]
    decode_only = {i for i in range(vocab) if texts[i] == f" t{i}"}
    assert len(decode_only) > vocab // 10  # the tiny corpus leaves many gaps
    ids = ours.encode("The quick brown fox t123 t45, t500 and t 7 times.")
    assert ids and not decode_only & set(ids)
