"""Each tensor-parallel rank loads exactly its part of every tensor, from every checkpoint
layout (transformers 5.x fused experts, the hub's transposed ones, one tensor per expert), and
the splits are refused with a message when the checkpoint's shapes do not divide."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from common.config import ModelConfig
from common.shards import Shard
from services.language.model import Attention
from services.language.parallel.layers import (
    ExpertParallelExperts,
    ParallelDecoder,
    RowParallelLinear,
    TensorParallelExperts,
)
from services.language.parallel.plan import ShardPlan, check_splits
from services.language.weights import load_decoder
from services.tiny_model import make_tiny_model
from tests.checkpoints import per_expert_copy


@pytest.fixture(scope="module")
def layouts(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("layouts")
    hub = make_tiny_model(d / "hub", preset="tiny", seed=0, expert_layout="hub")
    return {
        "transformers": tiny_model,
        "hub": hub,
        "per-expert": per_expert_copy(tiny_model, d / "split"),
    }


def expected_part(full: torch.Tensor, part: Shard | None) -> torch.Tensor:
    if part is None:
        return full
    return torch.cat([full.narrow(part.dim, a, b - a) for a, b in part.ranges], dim=part.dim)


@pytest.mark.parametrize("layout", ["transformers", "hub", "per-expert"])
@pytest.mark.parametrize(("world", "ep"), [(2, False), (2, True), (4, False), (4, True)])
def test_each_rank_holds_exactly_its_part(layouts, tiny_model, layout, world, ep):
    cfg = ModelConfig.from_dir(tiny_model)
    full = load_decoder(tiny_model, cfg, kernel_layout=False).state_dict()
    for rank in range(world):
        plan = ShardPlan.of(cfg.text, rank, world, ep)
        model = load_decoder(layouts[layout], cfg, parallel=ParallelDecoder(plan, None),
                             kernel_layout=False)  # fmt: skip
        state = model.state_dict()
        # Rank 0 alone embeds and samples.
        assert ("model.embed_tokens.weight" in state) == (rank == 0)
        assert ("lm_head.weight" in state) == (rank == 0)
        for key, tensor in state.items():
            assert torch.equal(tensor, expected_part(full[key], plan.shard(key))), (key, rank)
        attn = model.model.layers[0].self_attn
        assert isinstance(attn, Attention) and isinstance(attn.o_proj, RowParallelLinear)
        assert (attn.hq, attn.hkv) == (cfg.text.num_attention_heads // world, plan.local_kv_heads)
        experts = model.model.layers[0].mlp.experts
        assert isinstance(experts, ExpertParallelExperts if ep else TensorParallelExperts)


def test_more_ranks_than_kv_heads_replicate_them(tiny_model):
    """tiny: 4 query heads, 2 KV heads. At 4 ranks, ranks 0-1 share KV head 0, ranks 2-3 KV
    head 1, each with the one query head that reads it (query head h reads KV head h // 2)."""
    text = ModelConfig.from_dir(tiny_model).text
    plans = [ShardPlan.of(text, r, 4, False) for r in range(4)]
    assert [p.q_heads for p in plans] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert [p.kv_heads for p in plans] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [ShardPlan.of(text, r, 2, False).kv_heads for r in range(2)] == [(0, 1), (1, 2)]


def test_splits_that_do_not_divide_are_refused(tiny_model):
    text = ModelConfig.from_dir(tiny_model).text  # 4 heads, 2 KV heads, 4 experts, I = 24
    with pytest.raises(ValueError, match="3 does not divide .*4 attention heads"):
        check_splits(text, 3, False)
    with pytest.raises(ValueError, match="4 experts"):
        check_splits(dataclasses.replace(text, num_attention_heads=8), 8, True)
    with pytest.raises(ValueError, match="expert intermediate size of 24"):
        check_splits(dataclasses.replace(text, num_attention_heads=16, num_key_value_heads=16),
                     16, False)  # fmt: skip
    check_splits(text, 4, True)  # 4 experts over 4 ranks, one each
