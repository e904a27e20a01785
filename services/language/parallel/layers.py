"""Tensor and expert parallelism applied to the decoder as a transform (as gpt-fast does): the
model file stays the single-device architecture, and `shard_decoder` swaps in this rank's modules
(same names, so the checkpoint still loads by name) before any weight is loaded.

Per layer, on every rank, with the hidden states `[T, H]` identical on all ranks:
  attention: q/k/v of this rank's heads -> attention over this rank's KV cache -> o_proj over
             those heads' columns -> all-reduce (sum of the ranks' partial outputs) -> `[T, H]`;
  MoE:       the router on every rank (replicated weights, identical choices) -> this rank's part
             of the experts -> all-reduce;
  dense MLP: gate/up rows and down columns of this rank's part of the width -> all-reduce.
So each layer costs two all-reduces of `[T, H]`, and nothing else crosses ranks.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from common.config import TextConfig
from services.language.model import (
    MLP,
    Attention,
    Experts,
    Qwen3MoeForCausalLM,
    SparseMoeBlock,
)
from services.language.parallel.comm import Comm
from services.language.parallel.plan import ShardPlan


class ParallelDecoder(NamedTuple):
    """What `load_decoder` needs to build one rank's part."""

    plan: ShardPlan
    comm: Comm

    @property
    def holds_vocab(self) -> bool:
        """Rank 0 alone holds the embeddings and lm_head: it embeds every step's tokens (the
        rows it broadcasts) and samples, so the workers never need them."""
        return self.plan.rank == 0


class RowParallelLinear(nn.Linear):
    """A linear layer over this rank's slice of the input features: the ranks' partial sums
    all-reduced, the bias (whole on every rank) added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool, comm: Comm) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.comm.all_reduce(F.linear(x, self.weight))  # [T, out]
        return y if self.bias is None else y + self.bias


class TensorParallelExperts(Experts):
    """Every expert, I/N of its intermediate width: silu(gate) * up is elementwise in I, so the
    rank's down projection of its slice is a partial sum of the expert's output."""

    def __init__(self, cfg: TextConfig, comm: Comm) -> None:
        super().__init__(cfg)  # cfg: the rank's moe_intermediate_size
        self.comm = comm

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
    ) -> torch.Tensor:
        return self.comm.all_reduce(super().forward(x, weights, experts))


class ExpertParallelExperts(Experts):
    """Experts [first, first + E/N) whole. Every rank has every token (attention is tensor
    parallel), so dispatch is local: the (token, slot) pairs routed to this rank's experts run
    here, weighted, summed per token into `[T, H]` (zeros elsewhere), and the all-reduce adds
    the other ranks' experts: all-reduce of partial outputs, the simple baseline."""

    def __init__(self, cfg: TextConfig, first: int, comm: Comm) -> None:
        super().__init__(cfg)  # cfg: the rank's num_experts
        self.first, self.count, self.comm = first, cfg.num_experts, comm

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
    ) -> torch.Tensor:
        local = experts - self.first  # [T, K]
        token, slot = ((local >= 0) & (local < self.count)).nonzero(as_tuple=True)  # [M]
        out = torch.zeros_like(x)  # [T, H]
        if token.numel():
            rows = super().forward(x[token], weights[token, slot, None], local[token, slot, None])
            out.index_add_(0, token, rows)  # a token's slots in top-k order
        return self.comm.all_reduce(out)  # every rank joins, with or without rows


def shard_decoder(model: Qwen3MoeForCausalLM, cfg: TextConfig, parallel: ParallelDecoder) -> None:
    """Replace `model`'s (meta-device) modules by this rank's parts, in place."""
    plan, comm = parallel
    local = dataclasses.replace(
        cfg,
        num_attention_heads=plan.local_heads,
        num_key_value_heads=plan.local_kv_heads,
        moe_intermediate_size=plan.moe_intermediate[1] - plan.moe_intermediate[0],
        num_experts=plan.experts[1] - plan.experts[0],
    )
    width = plan.intermediate[1] - plan.intermediate[0]
    with torch.device("meta"):
        for i, layer in enumerate(model.model.layers):
            attn = Attention(local, i)
            attn.o_proj = RowParallelLinear(local.num_attention_heads * cfg.head_dim,
                                            cfg.hidden_size, cfg.attention_bias, comm)  # fmt: skip
            layer.self_attn = attn
            if isinstance(layer.mlp, SparseMoeBlock):
                layer.mlp.experts = (
                    ExpertParallelExperts(local, plan.experts[0], comm)
                    if plan.expert_parallel
                    else TensorParallelExperts(local, comm)
                )
            else:
                mlp = MLP(cfg.hidden_size, width)
                mlp.down_proj = RowParallelLinear(width, cfg.hidden_size, False, comm)
                layer.mlp = mlp
    if not parallel.holds_vocab:
        model.model.register_module("embed_tokens", None)
        model.register_module("lm_head", None)
