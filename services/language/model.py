"""Qwen3 MoE (and dense) text decoder with deepstack input (architecture only).

One decoder class serves the language half of Qwen3-VL-MoE / Qwen3-VL checkpoints and plain
Qwen3-MoE text checkpoints. Its forward takes flattened tokens (no batch dimension):

    input_embeds           [T, H]      text embeddings with image rows already scattered in
    positions              [3, T]      M-RoPE t/h/w positions (equal rows for text)
    input_deepstack_embeds [T, D*H]    optional; zeros on text rows

and, for layer i < D, adds `input_deepstack_embeds[:, i*H:(i+1)*H]` to the hidden states *after*
that layer (after its residual add), as transformers' `_deepstack_process` does. Chunked prefill
passes the same token range of both tensors. K/V storage and the attention kernel come from an
`AttentionBackend`. Parameter names follow the checkpoint so weights load by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common import cores
from common.config import TextConfig
from services.language.attention import AttentionBackend
from services.language.kernels import (
    add_rms_norm_kernel,
    moe_kernel,
    moe_weight_layout,
    qk_norm_rope_kernel,
    rms_norm_kernel,
)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_kernel(x.device)(x, self.weight, self.eps)

    def forward_residual(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused `residual + x` and its norm: returns (normed, new_residual)."""
        return add_rms_norm_kernel(x.device)(x, residual, self.weight, self.eps)


class MRotaryEmbedding(nn.Module):
    """Interleaved M-RoPE: frequency j takes its angle from axis t, h (j%3==1) or w (j%3==2).

    With `mrope_section=None` (text checkpoints) every frequency uses row 0, i.e. plain RoPE; for
    text tokens all three rows are equal, so both reduce to the same rotation.
    """

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.head_dim, self.theta, self.section = cfg.head_dim, cfg.rope_theta, cfg.mrope_section
        # Computed on first use in fp32 (not a buffer): the model can be built on the meta device
        # and loaded by assignment, and casting weights to bf16 never rounds the frequencies.
        self._inv_freq: torch.Tensor | None = None

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if self._inv_freq is None or self._inv_freq.device != device:
            exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float, device=device)
            self._inv_freq = 1.0 / (self.theta ** (exponent / self.head_dim))
        return self._inv_freq

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        freqs = positions[..., None].float() * self.inv_freq(positions.device)  # [3, T, hd/2]
        if self.section is None:
            f = freqs[0]
        else:
            f = freqs[0].clone()
            for axis in (1, 2):
                sl = slice(axis, self.section[axis] * 3, 3)
                f[..., sl] = freqs[axis, ..., sl]
        emb = torch.cat((f, f), dim=-1)  # [T, hd]
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.hq, self.hkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = self.hd**-0.5
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.hq * self.hd, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.hkv * self.hd, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.hkv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.hq * self.hd, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)  # per head, before RoPE
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.qkv_proj: nn.Module | None = None  # q/k/v in one GEMM once `fuse_qkv` ran
        self.qkv_sizes: list[int] = []

    def fuse_qkv(self) -> None:
        """One `[(Hq + 2 Hkv) * hd, H]` linear layer for the three projections: one GEMM instead
        of three per layer; q/k/v_proj are removed. Called once after loading (the checkpoint's
        names stay q/k/v_proj)."""
        layers = [self.q_proj, self.k_proj, self.v_proj]
        with torch.no_grad():
            weight = torch.cat([m.weight for m in layers])
            biases: list[torch.Tensor] = [m.bias for m in layers if m.bias is not None]
            bias = torch.cat(biases) if len(biases) == len(layers) else None
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        fused.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            fused.bias = nn.Parameter(bias, requires_grad=False)
        self.qkv_sizes = [m.weight.shape[0] for m in layers]
        self.qkv_proj = fused
        del self.q_proj, self.k_proj, self.v_proj

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q `[T, Hq*hd]`, k and v `[T, Hkv*hd]`."""
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.qkv_proj(x).split(self.qkv_sizes, dim=-1)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: AttentionBackend
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.project(x)
        q, k = qk_norm_rope_kernel(x.device)(
            q,
            k,
            self.q_norm.weight,
            self.k_norm.weight,
            cos,
            sin,
            (self.hq, self.hkv),
            self.q_norm.eps,
        )  # [T, Hq, hd], [T, Hkv, hd]: q_norm / k_norm per head, then RoPE
        v = v.reshape(t, self.hkv, self.hd)
        out = backend.attend(self.layer, q, k, v, self.scale)  # [T, Hq, hd]
        return self.o_proj(out.reshape(t, self.hq * self.hd))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TopKRouter(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.top_k, self.renormalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)  # [T, E]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)  # router math in fp32
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # [T, K]
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(logits.dtype), experts


class Experts(nn.Module):
    """Fused expert weights: gate_up_proj `[E, 2I, H]` (gate rows first), down_proj `[E, H, I]`."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        e, i, h = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def use_kernel_layout(self) -> None:
        """Re-store the weights (same shapes and values) as the MoE kernel for their device
        reads them fastest; called once after loading."""
        layout = moe_weight_layout(self.gate_up_proj.device)
        with torch.no_grad():
            for p in (self.gate_up_proj, self.down_proj):
                p.data = layout(p.data)

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
    ) -> torch.Tensor:
        """x `[T, H]`, weights/experts `[T, K]` -> `[T, H]` via the kernel registry."""
        return moe_kernel(x.device)(x, self.gate_up_proj, self.down_proj, weights, experts)


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.gate = TopKRouter(cfg)
        self.experts = Experts(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.gate(x)
        return self.experts(x, weights, experts)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module = (
            SparseMoeBlock(cfg)
            if cfg.is_moe_layer(layer)
            else MLP(cfg.hidden_size, cfg.intermediate_size)
        )

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: AttentionBackend
    ) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), cos, sin, backend)
        normed, x = self.post_attention_layernorm.forward_residual(h, x)  # x <- x + h
        return x + self.mlp(normed)


class Qwen3MoeModel(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = MRotaryEmbedding(cfg)

    def forward(
        self,
        input_embeds: torch.Tensor,
        positions: torch.Tensor,
        backend: AttentionBackend,
        input_deepstack_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Returns the last layer's hidden states `[T, H]`, before the final norm."""
        h = self.cfg.hidden_size
        num_deepstack = 0
        if input_deepstack_embeds is not None:
            if input_deepstack_embeds.shape[0] != input_embeds.shape[0]:
                raise ValueError("input_deepstack_embeds must have one row per token")
            num_deepstack = input_deepstack_embeds.shape[1] // h
        cos, sin = self.rotary_emb(positions, input_embeds.dtype)
        x = input_embeds
        for i, layer in enumerate(self.layers):
            cores.rebalance()  # under `epd up`: the cores another role took or left since
            x = layer(x, cos, sin, backend)
            if i < num_deepstack:
                assert input_deepstack_embeds is not None
                x = x + input_deepstack_embeds[:, i * h : (i + 1) * h].to(x.dtype)
        return x


class Qwen3MoeForCausalLM(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.model = Qwen3MoeModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        input_embeds: torch.Tensor,
        positions: torch.Tensor,
        backend: AttentionBackend,
        input_deepstack_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.model(input_embeds, positions, backend, input_deepstack_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits `[N, V]` for the rows that need them only (usually each sequence's last)."""
        return self.lm_head(self.model.norm(hidden))
