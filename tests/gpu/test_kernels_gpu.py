"""Triton kernels on the GPU against the torch reference at real Qwen3-VL-MoE shapes (bf16), and
greedy decoding of the tiny checkpoint on CUDA against the CPU path. Triton modules are imported
inside the tests: a collection-time import would fix their interpret mode for the whole run."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.conftest import requires_cuda

pytestmark = [pytest.mark.gpu, requires_cuda]

# bf16 operands, fp32 accumulation, against a float32 reference: ‖out − ref‖ / ‖ref‖ below this.
BF16_TOL = 1e-2


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("tokens", [1, 8, 64, 1024])
@pytest.mark.parametrize(("e", "k", "h", "i"), [(128, 8, 2048, 768), (128, 8, 4096, 1536)])
def test_fused_moe_bf16(tokens, e, k, h, i) -> None:
    from services.language.kernels import torch_ref, triton_moe

    g = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, h, device="cuda", generator=g)
    gate_up = torch.randn(e, 2 * i, h, device="cuda", generator=g) / h**0.5
    down = torch.randn(e, h, i, device="cuda", generator=g) / i**0.5
    w, experts = torch.topk(torch.randn(tokens, e, device="cuda", generator=g).softmax(-1), k)
    args16 = [a.bfloat16() for a in (x, gate_up, down, w)]
    out = triton_moe.fused_moe(*args16, experts)
    ref = torch_ref.fused_moe(*[a.float() for a in args16], experts)
    assert rel(out, ref) < BF16_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_add_rms_norm(dtype) -> None:
    from services.language.kernels import torch_ref, triton_norm

    x, r = (torch.randn(77, 2048, device="cuda", dtype=dtype) for _ in range(2))
    w = torch.rand(2048, device="cuda", dtype=dtype) + 0.5
    out, res = triton_norm.add_rms_norm(x, r, w, 1e-6)
    ref, ref_res = torch_ref.add_rms_norm(x.float(), r.float(), w.float(), 1e-6)
    assert rel(out, ref) < BF16_TOL and rel(res, ref_res) < BF16_TOL


@pytest.mark.parametrize("batch", [1, 8, 64])
def test_decode_attention(batch) -> None:
    from services.language.kernels import torch_ref, triton_attention

    hq, hkv, hd = 32, 4, 128
    lengths = [int(n) for n in torch.randint(1, 3000, (batch,))]
    slots = torch.randperm(sum(lengths) + 64, device="cuda")
    k_cache = torch.randn(slots.numel(), hkv, hd, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    seqs, used = [], 0
    for b, n in enumerate(lengths):
        seqs.append((b, 1, slots[used : used + n]))
        used += n
    q = torch.randn(batch, hq, hd, device="cuda", dtype=torch.bfloat16)
    meta = triton_attention.prepare(seqs, hkv, q.device)
    out = triton_attention.paged_attention(q, k_cache, v_cache, meta, hd**-0.5)
    ref = torch_ref.paged_attention(q.float(), k_cache.float(), v_cache.float(), seqs, hd**-0.5)
    assert rel(out, ref) < BF16_TOL


@torch.inference_mode()
def test_tiny_greedy_cuda_matches_cpu(tiny_checkpoint) -> None:
    """The engine on CUDA (Triton kernels, fp32) gives the CPU path's greedy tokens."""
    from common.config import ModelConfig
    from services.language.engine.forward_batch import ForwardBatch, KVStorage
    from services.language.weights import load_decoder

    cfg = ModelConfig.from_dir(tiny_checkpoint)
    t = cfg.text
    results = []
    for device in (torch.device("cpu"), torch.device("cuda")):
        model = load_decoder(tiny_checkpoint, cfg).to(device)
        storage = KVStorage(t.num_hidden_layers, 8, 4, t.num_key_value_heads, t.head_dim,
                            torch.float32, device)  # fmt: skip
        table, tokens = list(range(8)), [5, 17, 3, 99, 42, 7, 8]
        new = list(tokens)
        for _ in range(8):
            done = len(tokens) - len(new)
            pos = torch.arange(done, len(tokens), device=device).expand(3, -1)
            seqs = [(0, len(new), storage.slots(table, len(tokens), device))]
            x = model.embed(torch.tensor(new, device=device))
            hidden = model(x, pos, ForwardBatch(storage, seqs))
            nxt = int(model.compute_logits(hidden[-1:]).argmax(-1))
            tokens.append(nxt)
            new = [nxt]
        results.append(tokens)
    assert results[0] == results[1]
