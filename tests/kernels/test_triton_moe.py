"""Triton fused MoE against the torch reference (float64) on small odd shapes."""

from __future__ import annotations

import pytest
import torch

from services.language.kernels import torch_ref
from services.language.kernels.triton_moe import MoeConfig, fused_moe, moe_align, pick_config
from tests.kernels.conftest import DEVICE, REL_TOL, rel_err

SMALL = MoeConfig(block_m=16, block_n=32, block_k=32)

# (T, E, K, H, I): odd H and I (masked tails in every GEMM dim), E not a multiple of anything,
# top-k 1 and 8, more experts than routed rows (most experts get no tokens).
SHAPES = [
    pytest.param(5, 7, 2, 33, 47, id="odd"),
    pytest.param(3, 9, 8, 40, 24, id="topk8"),
    pytest.param(1, 13, 1, 17, 19, id="decode-topk1"),
    pytest.param(21, 5, 3, 16, 32, id="multi-block"),  # ~13 rows per expert: 1-2 M-blocks each
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(
    t: int, e: int, k: int, h: int, i: int, dtype: torch.dtype, hub_layout: bool = False
) -> tuple[torch.Tensor, ...]:
    x = torch.randn(t, h)
    if hub_layout:  # transformers' older `[E, H, 2I]` / `[E, I, H]` storage, as transposed views
        gate_up = torch.randn(e, h, 2 * i).transpose(1, 2) / h**0.5
        down = torch.randn(e, i, h).transpose(1, 2) / i**0.5
    else:
        gate_up = torch.randn(e, 2 * i, h) / h**0.5
        down = torch.randn(e, h, i) / i**0.5
    weights, experts = torch.topk(torch.randn(t, e).softmax(-1), k)
    weights = weights / weights.sum(-1, keepdim=True)
    return (*(a.to(DEVICE, dtype) for a in (x, gate_up, down, weights)), experts.to(DEVICE))


def reference(x, gate_up, down, weights, experts) -> torch.Tensor:
    cpu64 = [a.cpu().double() for a in (x, gate_up, down, weights)]
    return torch_ref.fused_moe(*cpu64, experts.cpu())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("t", "e", "k", "h", "i"), SHAPES)
def test_fused_moe_matches_reference(t, e, k, h, i, dtype) -> None:
    torch.manual_seed(t * 100 + e)
    args = make_inputs(t, e, k, h, i, dtype)
    out = fused_moe(*args, config=SMALL)
    assert out.shape == (t, h) and out.dtype == dtype
    assert rel_err(out, reference(*args)) < REL_TOL[dtype]


def test_experts_without_tokens_and_table_config() -> None:
    """Routing that leaves most experts empty (and expert 0 too); tiles from the shape table."""
    torch.manual_seed(1)
    t, e, k, h, i = 4, 11, 2, 24, 40
    x, gate_up, down, weights, _ = make_inputs(t, e, k, h, i, torch.float32)
    experts = torch.tensor([[3, 10], [10, 3], [5, 3], [3, 10]], device=DEVICE)
    out = fused_moe(x, gate_up, down, weights, experts)  # config from pick_config
    assert rel_err(out, reference(x, gate_up, down, weights, experts)) < REL_TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_hub_layout_strides_need_no_copy(dtype) -> None:
    torch.manual_seed(2)
    args = make_inputs(6, 5, 2, 20, 36, dtype, hub_layout=True)
    assert not args[1].is_contiguous() and not args[2].is_contiguous()
    out = fused_moe(*args, config=SMALL)
    assert rel_err(out, reference(*args)) < REL_TOL[dtype]


def test_moe_align_groups_pads_and_keeps_every_row() -> None:
    torch.manual_seed(3)
    t, e, k, bm = 9, 6, 3, 4
    experts = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    experts[experts == 2] = 1  # expert 2 receives nothing
    sorted_ids, block_expert, num_padded = moe_align(experts, e, bm)
    n = t * k
    counts = torch.bincount(experts.flatten(), minlength=e)
    used = int(((counts + bm - 1) // bm * bm).sum())
    assert int(num_padded) == used and sorted_ids.shape[0] % bm == 0
    real = sorted_ids[sorted_ids < n].sort().values
    assert torch.equal(real, torch.arange(n, dtype=torch.int32))  # every row exactly once
    flat = experts.flatten()
    for b in range(used // bm):
        ids = sorted_ids[b * bm : (b + 1) * bm]
        ids = ids[ids < n].long()
        assert ids.numel() > 0 and (flat[ids] == block_expert[b]).all()
    assert (block_expert[used // bm :] == e).all()  # blocks past the end are skipped
    assert (sorted_ids[used:] == n).all()


def test_pick_config_by_rows_per_expert() -> None:
    assert pick_config(1, 8, 128).block_m == 16  # decode
    assert pick_config(512, 8, 128).block_m == 32  # 32 rows per expert
    assert pick_config(4096, 8, 128).block_m == 64  # prefill


def test_shape_mismatch_raises() -> None:
    x, gate_up, down, weights, experts = make_inputs(2, 3, 1, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="shapes disagree"):
        fused_moe(x, gate_up, down[:, :8], weights, experts)
