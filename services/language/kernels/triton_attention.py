"""Triton decode attention over the paged KV cache (split-KV flash decoding, GQA).

K/V are read in place from one layer's cache `[slots, Hkv, hd]` through each sequence's table of
pages of `page` slots (slot of token j = table[j // page] * page + j % page): page 1 is a slot
table (the eager path), page = block size a block table (the CUDA-graph path, whose static table
stays small). Nothing is gathered into a contiguous copy. q/k norm and M-RoPE were applied by the
decoder before the K/V were written.

Grid `(B, Hkv, S)`: program (b, g, s) takes the G = Hq/Hkv query heads that share KV head g
(rows of one `tl.dot`, padded to 16) over tokens [s*chunk_b, (s+1)*chunk_b) of sequence b, with
an online softmax in fp32; it writes a partial output and its log-sum-exp. A second kernel merges
the S partials. chunk_b = ceil(len_b / S) rounded up to BLOCK_N is computed on the device from
each sequence's own length, so the launch depends only on (B, S) and no host value of a length:
a CUDA graph captured for a batch size replays over any lengths. S is chosen so that B*Hkv*S
fills the GPU at batch 1 too. Prefill chunks (more than one new token) go to the torch
reference, which gathers their K/V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.nn.utils.rnn import pad_sequence

from services.language.kernels import torch_ref
from services.language.kernels.triton_common import (
    cdiv,
    check_dtype,
    dot_precision,
    max_,
    sum_,
    upcast_tiles,
)

BLOCK_N = 32  # KV tokens per inner step


@triton.jit
def _decode_partial_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, part_o_ptr, part_lse_ptr,
    scale, group, head_dim,
    stride_qb, stride_qh, stride_ks, stride_kh, stride_tb,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    s = tl.program_id(2)
    num_splits = tl.num_programs(2)
    length = tl.load(lens_ptr + b)  # >= 1: split 0 always holds token 0
    chunk = cdiv(cdiv(length, num_splits), BLOCK_N) * BLOCK_N  # tokens per split, this sequence
    start = s * chunk
    end = tl.minimum(start + chunk, length)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = g * group + offs_g  # query heads of this KV head
    g_ok, d_ok = offs_g < group, offs_d < head_dim
    q_ptrs = q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]  # [G, D]
    q = tl.load(q_ptrs, mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    denom = tl.full((BLOCK_G,), 0.0, tl.float32)
    acc = tl.full((BLOCK_G, BLOCK_D), 0.0, tl.float32)
    kv_head = g * stride_kh
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        if PAGE == 1:  # slot table
            slots = tl.load(table_ptr + b * stride_tb + offs_n, mask=n_ok, other=0).to(tl.int64)
        else:  # block table
            page = tl.load(table_ptr + b * stride_tb + offs_n // PAGE, mask=n_ok, other=0)
            slots = page.to(tl.int64) * PAGE + offs_n % PAGE
        kv_off = slots[:, None] * stride_ks + kv_head + offs_d[None, :]  # [N, D]
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [G, N] fp32
        scores = tl.where(n_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, max_(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        denom = denom * alpha + sum_(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    has = denom > 0  # false only for splits past the sequence's end
    out = acc / tl.where(has, denom, 1.0)[:, None]
    lse = tl.where(has, m + tl.log(tl.where(has, denom, 1.0)), float("-inf"))
    row = (b * group * tl.num_programs(1) + heads) * num_splits + s  # [G] into [B, Hq, S]
    tl.store(part_lse_ptr + row, lse, mask=g_ok)
    tl.store(part_o_ptr + row[:, None] * head_dim + offs_d[None, :], out,
             mask=g_ok[:, None] & d_ok[None, :])  # fmt: skip


@triton.jit
def _merge_kernel(
    part_o_ptr, part_lse_ptr, out_ptr, num_splits, head_dim,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """out[bh] = sum_s exp(lse_s - max) * o_s / sum_s exp(lse_s - max), one program per (b, h)."""
    bh = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok, d_ok = offs_s < num_splits, offs_d < head_dim
    lse = tl.load(part_lse_ptr + bh * num_splits + offs_s, mask=s_ok, other=float("-inf"))
    w = tl.exp(lse - max_(lse, axis=0))  # [S]; split 0 always holds tokens, so max is finite
    o = tl.load(part_o_ptr + (bh * num_splits + offs_s)[:, None] * head_dim + offs_d[None, :],
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    out = sum_(o * w[:, None], axis=0) / sum_(w, axis=0)
    tl.store(out_ptr + bh * head_dim + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


@dataclass
class DecodeMeta:
    """Per-forward decode metadata, built once and shared by every layer."""

    rows: torch.Tensor | None  # [B] rows of q that are single-token sequences (None: all rows)
    table: torch.Tensor  # [B, W] page of each run of `page` cached tokens; read below lengths only
    lengths: torch.Tensor  # [B] int32 tokens cached (the new one included), each >= 1
    num_splits: int  # S: KV splits per (sequence, KV head); fixes the grid
    page: int = 1  # slots per table entry: 1 = slot table, block size = block table


@dataclass
class Meta:
    decode: DecodeMeta | None
    prefill: list[tuple[int, int, torch.Tensor]]  # torch reference handles these


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: few programs, but still more than one split in tests


def prepare(
    seqs: list[tuple[int, int, torch.Tensor]] | torch_ref.PagedMeta,
    num_kv_heads: int,
    device: torch.device,
) -> Meta:
    if isinstance(seqs, torch_ref.PagedMeta):  # the runner's step metadata
        m = seqs
        if m.decode_rows is None:
            return Meta(None, m.prefill)
        assert m.decode_slots is not None and m.decode_lens is not None
        b = m.decode_rows.shape[0]
        max_splits = triton.cdiv(m.decode_max_len, BLOCK_N)
        meta = DecodeMeta(
            rows=m.decode_rows,
            table=m.decode_slots.view(b, -1),
            lengths=m.decode_lens.to(torch.int32),
            num_splits=min(max_splits, num_splits_for(b, num_kv_heads, device)),
        )
        return Meta(meta, m.prefill)
    decode = [s for s in seqs if s[1] == 1]
    prefill = [s for s in seqs if s[1] != 1]
    if not decode:
        return Meta(None, prefill)
    lengths = [s[2].shape[0] for s in decode]
    max_len = max(lengths)
    max_splits = triton.cdiv(max_len, BLOCK_N)
    meta = DecodeMeta(
        rows=torch.tensor([s[0] for s in decode], device=device),
        table=pad_sequence([s[2] for s in decode], batch_first=True),
        lengths=torch.tensor(lengths, dtype=torch.int32, device=device),
        num_splits=min(max_splits, num_splits_for(len(decode), num_kv_heads, device)),
    )
    return Meta(meta, prefill)


def num_splits_for(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """KV splits that make batch*Hkv*S programs fill the device (at least 1). Depends on the batch
    size only, so a CUDA graph fixes it per captured batch size."""
    return max(1, triton.cdiv(_target_programs(device), batch * num_kv_heads))


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: DecodeMeta, scale: float
) -> torch.Tensor:
    """q `[B, Hq, hd]` (one new token per sequence) -> `[B, Hq, hd]`."""
    dtype = check_dtype(q, k_cache, v_cache)
    b, hq, hd = q.shape
    hkv = k_cache.shape[1]
    if hq % hkv or k_cache.stride(2) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("need Hq % Hkv == 0 and K/V caches [slots, Hkv, hd] with unit hd stride")
    q = q.contiguous()
    if meta.table.shape[0] != b or meta.lengths.shape != (b,):
        raise ValueError(f"metadata for {meta.lengths.shape[0]} sequences, q has {b}")
    group, s = hq // hkv, meta.num_splits
    part_o = torch.empty(b, hq, s, hd, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(b, hq, s, dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(hd))
    _decode_partial_kernel[(b, hkv, s)](
        q, k_cache, v_cache, meta.table, meta.lengths, part_o, part_lse,
        scale, group, hd,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), meta.table.stride(0),
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=BLOCK_N, BLOCK_D=block_d,
        PAGE=meta.page,
        UPCAST=upcast_tiles(dtype), PRECISION=dot_precision(dtype),
    )  # fmt: skip
    out = torch.empty_like(q)
    _merge_kernel[(b * hq,)](
        part_o, part_lse, out, s, hd, BLOCK_S=triton.next_power_of_2(s), BLOCK_D=block_d
    )
    return out


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: Meta, scale: float
) -> torch.Tensor:
    """Same result as `torch_ref.paged_attention` over the sequences `meta` was built from."""
    out = torch_ref.paged_attention(q, k_cache, v_cache, meta.prefill, scale)
    if meta.decode is not None:
        d = meta.decode
        assert d.rows is not None  # prepare lists the decode rows of a mixed batch
        out[d.rows] = decode_attention(q[d.rows], k_cache, v_cache, d, scale)
    return out
