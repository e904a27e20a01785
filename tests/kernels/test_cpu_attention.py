"""The C++ decode attention reads the paged cache in place and equals the torch reference, in a
step that mixes decode rows and a prefill chunk, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from services.language.kernels import cpu_ext, torch_ref
from services.language.kernels.cpu_attention import CpuAttention

pytestmark = pytest.mark.skipif(
    not cpu_ext.supported() or cpu_ext.extension() is None,
    reason="the C++ kernels need an AVX-512 CPU and a compiler",
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("hq", "hkv", "hd"), [(8, 2, 64), (4, 4, 16), (6, 1, 128)])
def test_decode_rows_equal_the_reference(dtype, hq, hkv, hd):
    g = torch.Generator().manual_seed(hq * hd)
    slots_total = 400
    k = torch.randn(slots_total, hkv, hd, generator=g).to(dtype)
    v = torch.randn(slots_total, hkv, hd, generator=g).to(dtype)
    perm = torch.randperm(slots_total, generator=g)
    # Decode rows of 1, 31, 33 and 150 tokens (block edges of the kernel), a prefill chunk of 5.
    lens, seqs, start, q_start = [1, 31, 33, 150], [], 0, 0
    for n in lens:
        seqs.append((q_start, 1, perm[start : start + n]))
        start, q_start = start + n, q_start + 1
    seqs.insert(2, (q_start, 5, perm[start : start + 12]))
    q = torch.randn(q_start + 5, hq, hd, generator=g).to(dtype)
    backend = CpuAttention()
    ours = backend(q, k, v, backend.prepare(seqs, hkv, q.device), hd**-0.5)
    ref = torch_ref.paged_attention(q.float(), k.float(), v.float(), seqs, hd**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (ours.float() - ref).abs().max().item() < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_prefill_chunks_run_as_rows_and_long_ones_through_sdpa(dtype):
    """A step of decode rows, a prompt of 20, and a chunk of 7 continuing a prompt (past 30):
    every row through the kernel (causal per row). A chunk past MAX_ROW_CONTEXT sends the
    prefill to the reference; both equal the reference."""
    from services.language.kernels.cpu_attention import MAX_ROW_CONTEXT, RowsMeta

    g = torch.Generator().manual_seed(5)
    hq, hkv, hd, total = 8, 2, 64, 2 * MAX_ROW_CONTEXT + 200
    k = torch.randn(total, hkv, hd, generator=g).to(dtype)
    v = torch.randn(total, hkv, hd, generator=g).to(dtype)
    perm = torch.randperm(total, generator=g)
    backend = CpuAttention()
    for long in (False, True):
        first = MAX_ROW_CONTEXT + 10 if long else 20
        seqs = [
            (0, 1, perm[:40]),
            (1, first, perm[40 : 40 + first]),
            (1 + first, 7, perm[40 + first : 40 + first + 37]),
            (8 + first, 1, perm[100 + first : 103 + first]),
        ]
        q = torch.randn(9 + first, hq, hd, generator=g).to(dtype)
        meta = backend.prepare(seqs, hkv, q.device)
        assert isinstance(meta, RowsMeta) != long
        ours = backend(q, k, v, meta, hd**-0.5)
        ref = torch_ref.paged_attention(q.float(), k.float(), v.float(), seqs, hd**-0.5)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert (ours.float() - ref).abs().max().item() < tol
