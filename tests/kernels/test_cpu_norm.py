"""The C++ norms and q/k norm + rotary (services/language/kernels/cpu_norm.py) against the torch
reference: fp32 within rounding of the sum of squares, bf16 within one bf16 step."""

from __future__ import annotations

import pytest
import torch

from services.language.kernels import cpu_ext, cpu_norm, torch_ref

pytestmark = pytest.mark.skipif(
    not cpu_ext.supported() or cpu_ext.extension() is None,
    reason="the C++ kernels need an AVX-512 CPU and a compiler",
)


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    scale = ref.float().abs().max().item()
    tol = 2e-6 if ref.dtype == torch.float32 else 8e-3  # bf16: 2^-7 of the largest value
    assert (ours.float() - ref.float()).abs().max().item() <= tol * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 130])
def test_rms_norm_and_add_rms_norm_equal_the_reference(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 512, generator=g) * 3).to(dtype)
    res = torch.randn(rows, 512, generator=g).to(dtype)
    w = (torch.rand(512, generator=g) + 0.5).to(dtype)
    _close(cpu_norm.rms_norm(x, w, 1e-6), torch_ref.rms_norm(x, w, 1e-6))
    normed, new_res = cpu_norm.add_rms_norm(x, res, w, 1e-6)
    ref_normed, ref_res = torch_ref.add_rms_norm(x, res, w, 1e-6)
    assert torch.equal(new_res, ref_res)  # one rounded add, as torch's
    _close(normed, ref_normed)
    heads = x.view(rows, 8, 64)  # leading dims kept
    _close(cpu_norm.rms_norm(heads, w[:64], 1e-6), torch_ref.rms_norm(heads, w[:64], 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("hq", "hkv", "hd"), [(8, 2, 64), (4, 4, 128), (2, 1, 32)])
def test_qk_norm_rope_equals_the_reference_on_strided_views(dtype, hq, hkv, hd):
    g = torch.Generator().manual_seed(hq * hd)
    t = 19
    qkv = (torch.randn(t, (hq + 2 * hkv) * hd, generator=g) * 2).to(dtype)
    q, k, _ = qkv.split([hq * hd, hkv * hd, hkv * hd], dim=-1)  # row-strided, as in the model
    qw = (torch.rand(hd, generator=g) + 0.5).to(dtype)
    kw = (torch.rand(hd, generator=g) + 0.5).to(dtype)
    angles = torch.rand(t, hd // 2, generator=g) * 100
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    ours = cpu_norm.qk_norm_rope(q, k, qw, kw, cos, sin, (hq, hkv), 1e-6)
    ref = torch_ref.qk_norm_rope(q, k, qw, kw, cos, sin, (hq, hkv), 1e-6)
    for a, b in zip(ours, ref, strict=True):
        _close(a, b)


def test_shapes_the_kernels_do_not_take_go_to_the_reference():
    x, w = torch.randn(3, 24), torch.rand(24)  # 24: not a multiple of 16
    assert torch.equal(cpu_norm.rms_norm(x, w, 1e-6), torch_ref.rms_norm(x, w, 1e-6))
    q, k = torch.randn(2, 2 * 48), torch.randn(2, 48)  # hd 48: not a multiple of 32
    cos, sin = torch.rand(2, 48), torch.rand(2, 48)
    qw, kw = torch.rand(48), torch.rand(48)
    ours = cpu_norm.qk_norm_rope(q, k, qw, kw, cos, sin, (2, 1), 1e-6)
    ref = torch_ref.qk_norm_rope(q, k, qw, kw, cos, sin, (2, 1), 1e-6)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True))
