"""M-RoPE positions against transformers' get_rope_index, and the decode rule."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from services.language.mrope import decode_positions, mrope_positions

IMG = 7


def hf_rope_index(ids: list[int], grids: list[tuple[int, int, int]]):
    cfg = tf.Qwen3VLMoeConfig(
        text_config={"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1,
                     "num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 8},
        vision_config={"depth": 1, "hidden_size": 16, "num_heads": 2, "out_hidden_size": 32,
                       "deepstack_visual_indexes": [0]},
        image_token_id=IMG,
    )  # fmt: skip
    with torch.device("meta"):
        model = tf.Qwen3VLMoeModel(cfg)
    input_ids = torch.tensor([ids])
    pos, delta = model.get_rope_index(
        input_ids,
        (input_ids == IMG).int(),
        image_grid_thw=torch.tensor(grids) if grids else None,
    )
    return pos[:, 0], int(delta[0, 0])


@pytest.mark.parametrize(
    "grids",
    [[], [(1, 4, 6)], [(1, 6, 4), (1, 2, 2)], [(1, 8, 8), (1, 4, 10), (1, 2, 6)]],
)
def test_positions_and_delta_match_transformers(grids):
    ids = [1, 2, 3]
    for t, h, w in grids:
        ids += [4] + [IMG] * (t * h * w // 4) + [5, 6]
    ids += [8, 9]
    ours, delta = mrope_positions(ids, IMG, grids, 2)
    ref, ref_delta = hf_rope_index(ids, grids)
    assert torch.equal(ours, ref) and delta == ref_delta


def test_image_advances_by_max_side_not_token_count():
    ids = [1] + [IMG] * 6 + [2]  # one image on a 2x3 merged grid
    pos, delta = mrope_positions(ids, IMG, [(1, 4, 6)], 2)
    assert pos[:, 1].tolist() == [1, 1, 1]
    assert pos[:, 6].tolist() == [1, 2, 3]
    assert pos[:, 7].tolist() == [4, 4, 4]  # 1 + max(2, 3)
    assert delta == 4 + 1 - 8
    assert decode_positions(8, delta).tolist() == [[5], [5], [5]]


def test_mismatched_image_tokens_are_rejected():
    with pytest.raises(ValueError, match="image-pad tokens"):
        mrope_positions([1, IMG, IMG, 2], IMG, [(1, 4, 4)], 2)
