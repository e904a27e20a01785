"""Plain-torch reference kernels (CPU and any device): the definition of correct results that
the Triton kernels are tested against."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence


@dataclass(frozen=True)
class PagedMeta:
    """Per-forward attention metadata, shared by every layer."""

    decode_rows: torch.Tensor | None  # [B] rows of q that are single-token (decode) sequences
    decode_slots: torch.Tensor | None  # [B * L] their K/V slots, each padded to L with slot 0
    decode_valid: torch.Tensor | None  # [B, 1, 1, L] True on real (not padding) slots
    prefill: list[tuple[int, int, torch.Tensor]]  # multi-token chunks, attended one by one
    decode_lens: torch.Tensor | None = None  # [B] int64 tokens of each decode sequence
    decode_max_len: int = 0  # L, known on the host (no device sync to read it)


def prepare_paged(seqs: list[tuple[int, int, torch.Tensor]]) -> PagedMeta:
    """`seqs[i] = (q_start, q_len, kv_slots)` as in `paged_attention`."""
    decode = [s for s in seqs if s[1] == 1]
    prefill = [s for s in seqs if s[1] != 1]
    if not decode:
        return PagedMeta(None, None, None, prefill)
    device = decode[0][2].device
    rows = torch.tensor([s[0] for s in decode], device=device)
    lengths = torch.tensor([s[2].shape[0] for s in decode], device=device)
    padded = pad_sequence([s[2] for s in decode], batch_first=True)  # [B, L]
    valid = torch.arange(padded.shape[1], device=device)[None] < lengths[:, None]
    return PagedMeta(rows, padded.flatten(), valid[:, None, None, :], prefill, lengths,
                     padded.shape[1])  # fmt: skip


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqs: list[tuple[int, int, torch.Tensor]] | PagedMeta,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached K/V.

    q `[T, Hq, hd]` holds the new tokens of all sequences back to back; `k_cache`/`v_cache`
    `[slots, Hkv, hd]` hold one layer's cache. `seqs[i] = (q_start, q_len, kv_slots)` with
    `kv_slots [kv_len]` the slots of the sequence's tokens 0..kv_len-1 (new ones included, already
    written), or the `PagedMeta` that `prepare_paged` built from them (once per forward). New
    token j of a sequence sits at position kv_len - q_len + j. Returns `[T, Hq, hd]`.

    Single-token (decode) sequences are attended together in one padded batch; longer chunks
    (prefill) one by one with a causal mask.
    """
    meta = seqs if isinstance(seqs, PagedMeta) else prepare_paged(seqs)
    out = torch.empty_like(q)
    if meta.decode_rows is not None:
        out[meta.decode_rows] = _decode_batch(q[meta.decode_rows], k_cache, v_cache, meta, scale)
    for q_start, q_len, slots in meta.prefill:
        kv_len = slots.shape[0]
        keys = k_cache.index_select(0, slots).transpose(0, 1)[None]  # [1, Hkv, kv_len, hd]
        values = v_cache.index_select(0, slots).transpose(0, 1)[None]
        qi = q[q_start : q_start + q_len].transpose(0, 1)[None]  # [1, Hq, q_len, hd]
        past = kv_len - q_len
        mask = None
        if past > 0:
            mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(past)
        o = F.scaled_dot_product_attention(
            qi, keys, values, attn_mask=mask, is_causal=past == 0, scale=scale, enable_gqa=True
        )
        out[q_start : q_start + q_len] = o[0].transpose(0, 1)
    return out


def _decode_batch(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedMeta, scale: float
) -> torch.Tensor:
    """q `[B, Hq, hd]`, one new token per sequence -> `[B, Hq, hd]`.

    The Hq/Hkv query heads that share a KV head (query head h reads KV head h // (Hq/Hkv)) go in
    as that head's query rows: `[B, Hkv, Hq/Hkv, hd]` against `[B, Hkv, L, hd]`, so SDPA never
    expands K/V for GQA (2x faster at 8 sequences on the `small` shapes than `enable_gqa`).
    """
    assert meta.decode_slots is not None and meta.decode_valid is not None
    b, hq, hd = q.shape
    hkv = k_cache.shape[1]
    width = meta.decode_valid.shape[-1]
    keys = k_cache.index_select(0, meta.decode_slots).view(b, width, hkv, hd).transpose(1, 2)
    values = v_cache.index_select(0, meta.decode_slots).view(b, width, hkv, hd).transpose(1, 2)
    o = F.scaled_dot_product_attention(
        q.reshape(b, hkv, hq // hkv, hd), keys, values, attn_mask=meta.decode_valid, scale=scale
    )  # [B, Hkv, Hq/Hkv, hd]
    return o.reshape(b, hq, hd)


# Grouped GEMM over experts (torch >= 2.10 has a CPU kernel); bit-identical to the loop on CPU.
_GROUPED_MM = hasattr(F, "grouped_mm")
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_layout(w: torch.Tensor) -> torch.Tensor:
    """`w [E, N, K]`, same shape and values, stored K-major: each expert's `w[e].T` contiguous.

    `fused_moe` hands `F.grouped_mm` the transposed weights; stored this way they are plain
    contiguous `[E, K, N]` operands, which the CPU kernel reads without a per-call relayout
    (measured on the `small` shapes: the MoE layer 25-35% faster at 8-128 routed tokens). The
    per-expert loop takes either layout. Results differ from the row-major layout only by GEMM
    rounding (~1e-7 relative in fp32).
    """
    return w.transpose(-2, -1).contiguous().transpose(-2, -1)


def fused_moe(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
) -> torch.Tensor:
    """x `[T, H]`, gate_up_proj `[E, 2I, H]` (gate rows first), down_proj `[E, H, I]`,
    router weights/experts `[T, K]` -> `[T, H]`. Any strides; `grouped_mm_layout` is fastest.

    The T*K (token, slot) rows are sorted by expert; one grouped GEMM per projection runs every
    expert's rows (`F.grouped_mm`, else a loop over the experts that received rows). Each row's
    weighted output lands in its own row of a `[T*K, H]` buffer (plain indexed writes: no
    scatter-add, which is slow on CPU), then the K slots are summed in top-k order, as
    transformers' grouped experts path does.
    """
    t, k = experts.shape
    out = x.new_empty(t * k, x.shape[1])
    flat = experts.flatten()  # [T*K]
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=gate_up_proj.shape[0])
    routing = weights.flatten()
    if (
        _GROUPED_MM
        and x.dtype == gate_up_proj.dtype
        and x.dtype in _GROUPED_DTYPES
        and _aligned(x.element_size(), x.shape[1], down_proj.shape[-1])
    ):
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        rows = x[order // k]  # [T*K, H] in expert order
        gate, up = F.grouped_mm(rows, gate_up_proj.transpose(-2, -1), offs=offsets).chunk(2, -1)
        y = F.grouped_mm(F.silu(gate) * up, down_proj.transpose(-2, -1), offs=offsets)
        out[order] = y * routing[order, None]
        return out.view(t, k, -1).sum(dim=1)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        idx = order[start : start + n]  # rows of the [T*K] layout routed to expert e
        start += n
        gate, up = F.linear(x[idx // k], gate_up_proj[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down_proj[e])  # [n, H]
        out[idx] = y * routing[idx, None]
    return out.view(t, k, -1).sum(dim=1)


def _aligned(element_size: int, *dims: int) -> bool:
    """`F.grouped_mm` takes rows of a multiple of 16 bytes only (a tensor-parallel shard of a
    tiny expert, I/N = 6 floats, is not); the loop takes any."""
    return all(d * element_size % 16 == 0 for d in dims)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise the last dim in fp32, round to x's dtype, then scale by `weight`."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`residual + x` (in x's dtype), then its RMSNorm: returns (normed, new_residual)."""
    new_residual = residual + x
    return rms_norm(new_residual, weight, eps), new_residual


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: tuple[int, int],
    eps: float,
    norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = rms_norm,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q `[T, Hq*hd]`, k `[T, Hkv*hd]`, the q/k norms' weights `[hd]`, cos / sin `[T, hd]` ->
    q `[T, Hq, hd]`, k `[T, Hkv, hd]`: each head normed (`norm`, the backend's RMSNorm), then
    rotated, `x * cos + rotate_half(x) * sin`."""
    hq, hkv = heads
    t, hd = q.shape[0], q.shape[1] // hq
    q = norm(q.reshape(t, hq, hd), q_weight, eps)
    k = norm(k.reshape(t, hkv, hd), k_weight, eps)
    c, s = cos[:, None, :], sin[:, None, :]
    return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
