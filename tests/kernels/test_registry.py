"""The kernel registry: torch on CPU, Triton on CUDA, a flag forces either; and the whole decoder
run through the Triton kernels greedily matches the torch path on the tiny checkpoint."""

from __future__ import annotations

import pytest
import torch

from common.config import ModelConfig
from services.language import kernels
from services.language.engine.forward_batch import ForwardBatch, KVStorage
from services.language.kernels import torch_ref
from services.language.weights import load_decoder
from tests.kernels.conftest import DEVICE

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_device_picks_backend(monkeypatch) -> None:
    from services.language.kernels import cpu_ext, cpu_moe, cpu_norm
    from services.language.kernels.cpu_attention import CpuAttention

    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    if kernels.cpu_kernels_supported():  # the C++ kernels on AVX-512 CPUs
        assert cpu_ext.extension() is not None
        assert kernels.backend_for(CPU) == "cpu"
        assert kernels.moe_kernel(CPU) is cpu_moe.fused_moe
        assert kernels.moe_weight_layout(CPU) is cpu_moe.pack_experts
        assert isinstance(kernels.attention_kernel(CPU), CpuAttention)
        assert kernels.rms_norm_kernel(CPU) is cpu_norm.rms_norm
        assert kernels.add_rms_norm_kernel(CPU) is cpu_norm.add_rms_norm
        assert kernels.qk_norm_rope_kernel(CPU) is cpu_norm.qk_norm_rope
    else:
        assert kernels.backend_for(CPU) == "torch"
        assert kernels.moe_kernel(CPU) is torch_ref.fused_moe
        assert isinstance(kernels.attention_kernel(CPU), kernels.TorchAttention)
    assert kernels.backend_for(CUDA) == "triton"
    assert kernels.moe_kernel(CPU, force="torch") is torch_ref.fused_moe
    assert kernels.rms_norm_kernel(CPU, force="torch") is torch_ref.rms_norm


def test_flag_and_env_force(monkeypatch) -> None:
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    assert kernels.backend_for(CUDA) == "torch"
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    assert kernels.backend_for(CPU) == "triton"
    assert kernels.backend_for(CPU, force="torch") == "torch"  # the argument beats the env
    monkeypatch.setenv(kernels.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="kernel backend"):
        kernels.backend_for(CPU)


def test_interpreter_is_active() -> None:
    """conftest set TRITON_INTERPRET before the kernels were decorated (CPU runs only)."""
    from services.language.kernels import triton_moe

    if DEVICE.type == "cpu":
        assert type(triton_moe._gate_up_kernel).__name__ == "InterpretedFunction"


def greedy(model_dir, backend: str, monkeypatch, steps: int = 4):
    """Two prompts prefilled together, then `steps` batched decode steps; tokens and logits."""
    monkeypatch.setenv(kernels.ENV_VAR, backend)
    cfg = ModelConfig.from_dir(model_dir)
    model = load_decoder(model_dir, cfg).to(DEVICE)
    t = cfg.text
    storage = KVStorage(t.num_hidden_layers, 16, 4, t.num_key_value_heads, t.head_dim,
                        torch.float32, DEVICE)  # fmt: skip
    tables = [list(range(0, 8)), list(range(8, 16))]
    tokens = [[5, 17, 3, 99, 42, 7, 8], [11, 2, 64, 31, 9, 100, 23, 4, 56, 12, 77]]
    fed = [list(p) for p in tokens]  # tokens whose K/V the next forward writes
    all_logits = []
    for _ in range(steps + 1):
        ids, pos, seqs, q_start = [], [], [], 0
        for b, seq in enumerate(fed):
            done = len(tokens[b]) - len(seq)  # tokens already cached
            ids += seq
            pos.append(torch.arange(done, done + len(seq), device=DEVICE))
            seqs.append((q_start, len(seq), storage.slots(tables[b], len(tokens[b]), DEVICE)))
            q_start += len(seq)
        p = torch.cat(pos)
        x = model.embed(torch.tensor(ids, device=DEVICE))
        hidden = model(x, p.expand(3, -1), ForwardBatch(storage, seqs))
        last = torch.tensor([s + n - 1 for s, n, _ in seqs], device=DEVICE)
        logits = model.compute_logits(hidden[last])
        all_logits.append(logits)
        nxt = logits.argmax(-1).tolist()
        for b in range(2):
            tokens[b].append(nxt[b])
        fed = [[n] for n in nxt]
    return tokens, torch.stack(all_logits)


@torch.inference_mode()
def test_decoder_greedy_matches_torch_path(tiny_model, monkeypatch) -> None:
    ref_tokens, ref_logits = greedy(tiny_model, "torch", monkeypatch)
    tokens, logits = greedy(tiny_model, "triton", monkeypatch)
    assert tokens == ref_tokens
    err = ((logits - ref_logits).norm() / ref_logits.norm()).item()
    assert err < 1e-5, err


def test_moe_weight_layout_per_backend(tiny_model, monkeypatch) -> None:
    """Loaded on CPU (torch backend) the expert weights are stored K-major, the layout
    F.grouped_mm reads without a relayout; values and shapes are unchanged, and the MoE gives
    the same result from either layout up to GEMM rounding."""
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    cfg = ModelConfig.from_dir(tiny_model)
    experts = load_decoder(tiny_model, cfg).model.layers[0].mlp.experts
    gate_up, down = experts.gate_up_proj, experts.down_proj
    assert gate_up.transpose(-2, -1).is_contiguous() and down.transpose(-2, -1).is_contiguous()
    row_major = gate_up.contiguous(), down.contiguous()
    assert not row_major[0].transpose(-2, -1).is_contiguous()
    w = torch.randn(2, 3, 4)
    assert kernels.moe_weight_layout(CUDA)(w) is w  # Triton reads the row-major layout
    torch.manual_seed(0)
    t, e, k = 37, gate_up.shape[0], cfg.text.num_experts_per_tok
    x = torch.randn(t, gate_up.shape[2])
    route = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    weights = torch.rand(t, k)
    fast = torch_ref.fused_moe(x, gate_up, down, weights, route)
    plain = torch_ref.fused_moe(x, *row_major, weights, route)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
