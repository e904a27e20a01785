"""Which part of the decoder one rank holds (pure arithmetic, no torch).

Tensor parallelism as Megatron-LM and vLLM split a Qwen3-MoE decoder over N ranks:

- attention by heads: rank r holds query heads [r*Hq/N, (r+1)*Hq/N) (q_proj rows, o_proj
  columns) and the KV heads they read. With N <= Hkv that is Hkv/N KV heads of its own; with
  N > Hkv (N a multiple of Hkv) each KV head is replicated on N/Hkv ranks and rank r holds KV head
  r // (N/Hkv) alone, as vLLM does. q/k norms are per head, so replicated;
- the MoE experts along their intermediate dimension (every rank holds every expert, I/N of its
  width: gate and up rows, down columns), or with expert parallelism E/N whole experts each;
- a dense MLP along its intermediate dimension;
- the router, the norms, the embeddings and lm_head replicated (the embeddings and lm_head on
  rank 0 only: see `ParallelDecoder`).

o_proj and the down projections give partial sums that an all-reduce completes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from common.config import TextConfig
from common.shards import Shard

_LAYER_KEY = re.compile(r"^model\.layers\.\d+\.(.+)$")


@dataclass(frozen=True)
class ShardPlan:
    rank: int
    world: int
    expert_parallel: bool
    hidden: int
    head_dim: int
    q_heads: tuple[int, int]  # this rank's query heads [start, stop)
    kv_heads: tuple[int, int]  # the KV heads they read
    num_heads: int  # Hq and Hkv of the whole model
    num_kv_heads: int
    moe_intermediate: tuple[int, int]  # this rank's part of each expert's I (all of it with EP)
    moe_intermediate_size: int
    experts: tuple[int, int]  # this rank's experts (all of them without EP)
    num_experts: int
    intermediate: tuple[int, int]  # this rank's part of a dense MLP's width
    intermediate_size: int

    @classmethod
    def of(cls, cfg: TextConfig, rank: int, world: int, expert_parallel: bool) -> ShardPlan:
        """ValueError naming the shape that does not split over `world` ranks."""
        check_splits(cfg, world, expert_parallel)
        hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        q = _part(hq, world, rank)
        if world <= hkv:
            kv = _part(hkv, world, rank)
        else:
            kv_head = rank // (world // hkv)
            kv = (kv_head, kv_head + 1)
        i, e = cfg.moe_intermediate_size, cfg.num_experts
        moe = (0, i) if expert_parallel else _part(i, world, rank)
        experts = _part(e, world, rank) if expert_parallel and e else (0, e)
        dense = _part(cfg.intermediate_size, world, rank)
        return cls(rank, world, expert_parallel, cfg.hidden_size, cfg.head_dim, q, kv, hq, hkv,
                   moe, i, experts, e, dense, cfg.intermediate_size)  # fmt: skip

    @property
    def local_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def local_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    def shard(self, key: str) -> Shard | None:
        """This rank's part of the module key `key`, None for a replicated tensor."""
        m = _LAYER_KEY.match(key)
        if m is None:
            return None  # embeddings, final norm, lm_head
        name, hd = m.group(1), self.head_dim
        q = ((self.q_heads[0] * hd, self.q_heads[1] * hd),)
        kv = ((self.kv_heads[0] * hd, self.kv_heads[1] * hd),)
        if name in ("self_attn.q_proj.weight", "self_attn.q_proj.bias"):
            return Shard(0, q, self.num_heads * hd)
        if name.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            return Shard(0, kv, self.num_kv_heads * hd)
        if name == "self_attn.o_proj.weight":
            return Shard(1, q, self.num_heads * hd)
        if name.startswith("mlp.experts."):
            return self._experts(name)
        a, b = self.intermediate
        if name in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            return Shard(0, ((a, b),), self.intermediate_size)
        if name == "mlp.down_proj.weight":
            return Shard(1, ((a, b),), self.intermediate_size)
        return None  # norms, router, o_proj bias (added once, after the all-reduce)

    def _experts(self, name: str) -> Shard:
        if self.expert_parallel:
            return Shard(0, (self.experts,), self.num_experts)
        i = self.moe_intermediate_size
        a, b = self.moe_intermediate
        if name == "mlp.experts.gate_up_proj":  # [E, 2I, H]: its gate rows, then its up rows
            return Shard(1, ((a, b), (i + a, i + b)), 2 * i)
        return Shard(2, ((a, b),), i)  # down_proj [E, H, I]: its columns


def check_splits(cfg: TextConfig, world: int, expert_parallel: bool) -> None:
    """ValueError unless every split `world` ranks need is even."""
    if world < 1:
        raise ValueError(f"--tensor-parallel-size must be positive, got {world}")
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    problems = []
    if hq % world:
        problems.append(f"{hq} attention heads")
    if (world <= hkv and hkv % world) or (world > hkv and world % hkv):
        problems.append(f"{hkv} KV heads (need a divisor or a multiple of the size)")
    if cfg.num_experts and expert_parallel and cfg.num_experts % world:
        problems.append(f"{cfg.num_experts} experts")
    if cfg.num_experts and not expert_parallel and cfg.moe_intermediate_size % world:
        problems.append(f"an expert intermediate size of {cfg.moe_intermediate_size}")
    dense = any(not cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    if dense and cfg.intermediate_size % world:
        problems.append(f"an MLP intermediate size of {cfg.intermediate_size}")
    if problems:
        raise ValueError(
            f"--tensor-parallel-size {world} does not divide the checkpoint's "
            + ", ".join(problems)
        )


def _part(n: int, world: int, rank: int) -> tuple[int, int]:
    size = n // world
    return rank * size, (rank + 1) * size
