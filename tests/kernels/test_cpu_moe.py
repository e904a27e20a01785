"""The CPU MoE kernel (services/language/kernels/cpu_moe.py) against the reference, and the
active-experts formulation the benchmark compares it with."""

from __future__ import annotations

import pytest
import torch

from bench.cpu_moe import active_loop, prepare_active_loop
from services.language.kernels import cpu_moe, torch_ref

E, H, I, K = 6, 128, 64, 2  # noqa: E741 (the config names) multiples of 64 (the C++ tiles); expert 5 never gets a row


def inputs(t: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(E, 2 * I, H, generator=g) * H**-0.5).to(dtype)
    down = (torch.randn(E, H, I, generator=g) * I**-0.5).to(dtype)
    x = torch.randn(t, H, generator=g).to(dtype)
    logits = torch.randn(t, E, generator=g)
    logits[:, 5] = -1e9  # an expert without rows: its weights must not matter
    w, experts = torch.topk(torch.softmax(logits, -1), K, dim=-1)
    return x, gate_up, down, (w / w.sum(-1, keepdim=True)).to(dtype), experts


def reference(x, gate_up, down, w, experts):
    lay = torch_ref.grouped_mm_layout
    return torch_ref.fused_moe(x, lay(gate_up), lay(down), w, experts)


@pytest.mark.parametrize("t", [1, 5, 33])
def test_active_loop_equals_the_reference(t):
    x, gu, dn, w, ex = inputs(t, torch.float32)
    ours = active_loop(x, prepare_active_loop(gu), prepare_active_loop(dn), w, ex)
    assert torch.equal(ours, reference(x, gu, dn, w, ex))


def test_packed_layouts_hold_the_same_weights():
    w = torch.arange(E * 64 * 6, dtype=torch.float32).view(E, 64, 6)  # [E, N, K]
    panels = cpu_moe.prepare_cpp(w)  # [E, N/16, K, 16]
    assert panels.shape == (E, 4, 6, 16)
    assert torch.equal(panels[2, 1, 3], w[2, 16:32, 3])
    pairs = cpu_moe.prepare_cpp(w, dpbf16=True)  # [E, N/16, K/2, 16, 2]
    assert pairs.shape == (E, 4, 3, 16, 2)
    assert torch.equal(pairs[2, 1, 1, 5], w[2, 16 + 5, 2:4])
    with pytest.raises(ValueError, match="N % 64"):
        cpu_moe.prepare_cpp(torch.zeros(E, 48, 6))


needs_cpp = pytest.mark.skipif(
    not (cpu_moe.supported() and cpu_moe.has_bf16_dot()),
    reason="the C++ kernel needs an AVX-512 CPU (and AVX512-BF16 for its bf16 path)",
)


@needs_cpp
@pytest.mark.parametrize("t", [1, 5, 33])
def test_cpp_tiles_match_the_reference_in_fp32(t):
    x, gu, dn, w, ex = inputs(t, torch.float32, seed=t)
    ref = reference(x, gu, dn, w, ex)
    ours = cpu_moe.cpp_moe(x, cpu_moe.prepare_cpp(gu), cpu_moe.prepare_cpp(dn), w, ex)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-5 * ref.abs().max().item()


@needs_cpp
@pytest.mark.parametrize("dpbf16", [False, True])
def test_cpp_tiles_in_bf16_are_as_close_to_fp32_math_as_the_reference(dpbf16):
    x, gu, dn, w, ex = inputs(33, torch.bfloat16, seed=7)
    exact = torch_ref.fused_moe(x.float(), gu.float(), dn.float(), w.float(), ex)
    ref = reference(x, gu, dn, w, ex)
    ours = cpu_moe.cpp_moe(
        x, cpu_moe.prepare_cpp(gu, dpbf16), cpu_moe.prepare_cpp(dn, dpbf16), w, ex, dpbf16
    )
    assert ours.dtype == torch.bfloat16
    ref_err = (ref.float() - exact).abs().max().item()
    assert 0 < (ours.float() - exact).abs().max().item() <= ref_err


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_pick_the_kernel_and_others_fall_back(dtype):
    x, gu, dn, w, ex = inputs(9, dtype, seed=3)
    packed = cpu_moe.pack_experts(gu)
    assert packed.ndim == (5 if dtype == torch.bfloat16 else 4)
    ours = cpu_moe.fused_moe(x, packed, cpu_moe.pack_experts(dn), w, ex)
    exact = torch_ref.fused_moe(x.float(), gu.float(), dn.float(), w.float(), ex)
    assert (ours.float() - exact).abs().max().item() < (1e-5 if dtype == torch.float32 else 2e-2)
    # A layer whose sizes the tiles cannot take keeps the reference's layout and kernel.
    odd = torch.randn(4, 48, 64)
    assert cpu_moe.pack_experts(odd).shape == odd.shape
    assert torch.equal(cpu_moe.pack_experts(odd), odd)


@needs_cpp
@pytest.mark.parametrize("dpbf16", [False, True])
def test_cpp_tiles_over_several_k_blocks_and_row_tiles(dpbf16):
    """Hidden 512 and intermediate 384: the tiles' k-blocks (128 fp32 / 256 bf16 weights deep,
    384 leaving a partial block in bf16), and ~16 rows per expert: several 6-row tiles and a
    partial one."""
    g = torch.Generator().manual_seed(11)
    e, h, i, t = 5, 512, 384, 40
    dtype = torch.bfloat16 if dpbf16 else torch.float32
    gu = (torch.randn(e, 2 * i, h, generator=g) * h**-0.5).to(dtype)
    dn = (torch.randn(e, h, i, generator=g) * i**-0.5).to(dtype)
    x = torch.randn(t, h, generator=g).to(dtype)
    w, ex = torch.topk(torch.softmax(torch.randn(t, e, generator=g), -1), 2, dim=-1)
    w = (w / w.sum(-1, keepdim=True)).to(dtype)
    exact = torch_ref.fused_moe(x.float(), gu.float(), dn.float(), w.float(), ex)
    ours = cpu_moe.cpp_moe(
        x, cpu_moe.prepare_cpp(gu, dpbf16), cpu_moe.prepare_cpp(dn, dpbf16), w, ex, dpbf16
    )
    if dpbf16:
        ref_err = (reference(x, gu, dn, w, ex).float() - exact).abs().max().item()
        assert (ours.float() - exact).abs().max().item() <= ref_err
    else:
        assert (ours - exact).abs().max().item() < 1e-5 * exact.abs().max().item()
