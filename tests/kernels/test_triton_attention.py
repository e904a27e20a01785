"""Triton paged decode attention against the torch reference (mixed decode/prefill batches)."""

from __future__ import annotations

import pytest
import torch

from services.language.kernels import torch_ref
from services.language.kernels.triton_attention import paged_attention, prepare
from tests.kernels.conftest import DEVICE, REL_TOL, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (Hq, Hkv, hd, kv lengths of decode sequences, prefill chunk (q_len, kv_len) or None)
CASES = [
    pytest.param(6, 2, 24, [1, 45, 100, 7], (3, 20), id="gqa3-mixed"),
    pytest.param(4, 1, 16, [77], None, id="b1-splits"),  # one sequence: several KV splits
    pytest.param(8, 2, 32, [5, 90], None, id="gqa4-empty-split"),  # short seq: an empty split
    pytest.param(2, 2, 20, [33, 2], (4, 4), id="mha"),
]


def build(hq, hkv, hd, lengths, prefill, dtype):
    """Caches with scattered slots; returns q, k_cache, v_cache, seqs."""
    total = sum(lengths) + (prefill[1] if prefill else 0)
    slots = torch.randperm(total + 11, device=DEVICE)  # unused slots hold garbage too
    k_cache = torch.randn(total + 11, hkv, hd, device=DEVICE).to(dtype)
    v_cache = torch.randn(total + 11, hkv, hd, device=DEVICE).to(dtype)
    seqs, q_start, used = [], 0, 0
    if prefill:
        seqs.append((0, prefill[0], slots[: prefill[1]]))
        q_start, used = prefill
    for n in lengths:
        seqs.append((q_start, 1, slots[used : used + n]))
        q_start, used = q_start + 1, used + n
    q = torch.randn(q_start, hq, hd, device=DEVICE).to(dtype)
    return q, k_cache, v_cache, seqs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("hq", "hkv", "hd", "lengths", "prefill"), CASES)
def test_paged_attention_matches_reference(hq, hkv, hd, lengths, prefill, dtype) -> None:
    torch.manual_seed(hq * 7 + len(lengths))
    q, k_cache, v_cache, seqs = build(hq, hkv, hd, lengths, prefill, dtype)
    scale = hd**-0.5
    meta = prepare(seqs, hkv, q.device)
    assert meta.decode is not None
    if len(lengths) == 1:
        assert meta.decode.num_splits > 1  # the split-KV merge is exercised
    out = paged_attention(q, k_cache, v_cache, meta, scale)
    cpu = [t.cpu().double() for t in (q, k_cache, v_cache)]
    ref = torch_ref.paged_attention(*cpu, [(a, b, s.cpu()) for a, b, s in seqs], scale)
    assert rel_err(out, ref) < REL_TOL[dtype]


def test_prefill_only_batch_uses_reference() -> None:
    q, k_cache, v_cache, seqs = build(4, 2, 16, [], (5, 9), torch.float32)
    meta = prepare(seqs, 2, q.device)
    assert meta.decode is None
    out = paged_attention(q, k_cache, v_cache, meta, 0.25)
    assert torch.equal(out, torch_ref.paged_attention(q, k_cache, v_cache, seqs, 0.25))
