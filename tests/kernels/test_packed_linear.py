"""Linear layers on CPU through oneDNN with packed weights (common/packed_linear.py): the same
results as `F.linear`, swapped in where they apply, and in the loaded decoder and tower."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.config import ModelConfig
from common.packed_linear import PackedLinear, linear_gelu, onednn_available, pack_linears
from services.encoder.weights import load_vision_tower
from services.language.weights import load_decoder

pytestmark = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear(bias):
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(512, 768, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(768, 512, generator=g) * 512**-0.5)
    x = torch.randn(2, 37, 512, generator=g)  # leading dims kept
    packed = PackedLinear(lin.weight, lin.bias)
    ref = F.linear(x, lin.weight, lin.bias)
    ours = packed(x)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-5 * ref.abs().max().item()  # summation order
    strided = torch.randn(9, 1024, generator=g)[:, ::2]
    assert (packed(strided) - F.linear(strided, lin.weight, lin.bias)).abs().max() < 1e-4
    xb, wb = x.bfloat16(), lin.weight.detach().bfloat16()
    bb = None if lin.bias is None else lin.bias.detach().bfloat16()
    assert torch.equal(PackedLinear(wb, bb)(xb), F.linear(xb, wb, bb))  # oneDNN both ways


class _Sub(nn.Linear):
    pass


def test_pack_linears_swaps_plain_cpu_linears_only(monkeypatch):
    m = nn.Sequential(nn.Linear(64, 64), _Sub(64, 64), nn.Sequential(nn.Linear(64, 32)))
    m.append(nn.Linear(64, 64).half())  # fp16: not packed
    assert pack_linears(m) == 2
    assert [type(x).__name__ for x in (m[0], m[1], m[2][0], m[3])] == [
        "PackedLinear", "_Sub", "PackedLinear", "Linear",
    ]  # fmt: skip
    tied = nn.Sequential(nn.Embedding(10, 64), nn.Linear(64, 10, bias=False))
    tied[1].weight = nn.Parameter(tied[0].weight.data)  # another Parameter, the same memory
    assert pack_linears(tied) == 0  # packing would copy the embeddings
    monkeypatch.setenv("EPD_KERNELS", "torch")  # the reference everywhere
    assert pack_linears(nn.Sequential(nn.Linear(64, 64))) == 0


def test_the_loaded_decoder_and_tower_use_packed_linears(tiny_model):
    cfg = ModelConfig.from_dir(tiny_model)
    decoder = load_decoder(tiny_model, cfg)
    attn = decoder.model.layers[0].self_attn
    assert isinstance(attn.qkv_proj, PackedLinear) and isinstance(attn.o_proj, PackedLinear)
    assert not hasattr(attn, "q_proj")  # fused: the three projections are one layer
    assert isinstance(decoder.lm_head, PackedLinear)
    tower = load_vision_tower(tiny_model, cfg)
    assert not [n for n, m in tower.named_modules() if type(m) is nn.Linear]
    assert any(isinstance(m, PackedLinear) for m in tower.modules())
    assert tower.patch_embed.packed is not None  # the patch conv as a linear layer
    pixels = torch.randn(2 * 16, tower.patch_embed.packed.in_features)
    conv = tower.patch_embed.proj(pixels.view(-1, *tower.patch_embed.proj.weight.shape[1:]))
    ours = tower.patch_embed(pixels, [16, 16])
    assert (ours - conv.view(ours.shape)).abs().max().item() < 1e-5 * conv.abs().max().item()


def test_linear_gelu_fuses_the_activation_into_packed_layers():
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(256, 1024)
    x = torch.randn(50, 256, generator=g)
    packed = PackedLinear(lin.weight, lin.bias)
    for approximate in ("none", "tanh"):
        ref = F.gelu(packed(x), approximate=approximate)
        assert (linear_gelu(packed, x, approximate) - ref).abs().max().item() < 1e-6
        plain = F.gelu(lin(x), approximate=approximate)
        assert torch.equal(linear_gelu(lin, x, approximate), plain)  # unpacked: F.gelu
