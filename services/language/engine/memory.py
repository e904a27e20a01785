"""How much KV cache a replica gets, and how long one sequence may be (`max_model_len`).

Both are decided once at start-up and logged. `max_model_len` is
min(the checkpoint's context, --max-model-len, what the KV cache holds): a real checkpoint's
context (262,144 tokens for Qwen3-VL-30B-A3B) is usually more than one replica's KV cache holds,
and a request without max_tokens then gets all the room that is really there.

On CUDA the KV cache is sized as vLLM sizes it: `--gpu-memory-utilization` of the device's
memory, less what is in use after the weights are loaded (ours and anyone else's) and less the
peak of a profiled forward of the largest step. `--kv-cache-bytes`, when given, wins everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from common.config import TextConfig
from services.language.attention import ContiguousKVCache

log = logging.getLogger(__name__)

DEFAULT_CPU_KV_BYTES = 1 << 30


def resolve_max_model_len(config_len: int, requested: int | None, kv_tokens: int) -> int:
    """The effective max_model_len; ValueError naming the flag to change when `requested` does
    not fit."""
    if requested is None:
        return min(config_len, kv_tokens)
    if requested <= 0:
        raise ValueError(f"--max-model-len must be positive, got {requested}")
    if requested > config_len:
        raise ValueError(
            f"--max-model-len {requested} is longer than the checkpoint's context "
            f"(max_position_embeddings = {config_len}); lower --max-model-len"
        )
    if requested > kv_tokens:
        raise ValueError(
            f"--max-model-len {requested} does not fit in the KV cache, which holds {kv_tokens} "
            "tokens; raise --kv-cache-bytes (or --gpu-memory-utilization on CUDA) or lower "
            "--max-model-len"
        )
    return requested


def kv_bytes_from_memory(total: int, free: int, utilization: float, activation_peak: int) -> int:
    """KV bytes when `utilization` of a device's `total` bytes may be ours: the budget less what
    is in use now (`total - free`: weights and other processes) and less the forward's peak."""
    if not 0 < utilization <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {utilization}")
    budget = int(total * utilization) - (total - free) - activation_peak
    if budget <= 0:
        raise ValueError(
            f"no memory left for the KV cache: {utilization:.2f} x {total / 2**30:.1f} GiB "
            f"minus {(total - free) / 2**30:.1f} GiB in use and a {activation_peak / 2**30:.2f} "
            "GiB forward peak; raise --gpu-memory-utilization or give --kv-cache-bytes"
        )
    return budget


def profile_kv_bytes(
    device: torch.device, utilization: float, run_peak_forward: Callable[[], None]
) -> int:
    """CUDA: run the largest forward once and size the KV cache from what is left."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run_peak_forward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    kv = kv_bytes_from_memory(total, free, utilization, peak)
    log.info(
        "KV cache sized from device memory: %.2f GiB (%.0f%% of %.1f GiB, %.1f GiB in use, "
        "forward peak %.2f GiB)",
        kv / 2**30, utilization * 100, total / 2**30, (total - free) / 2**30, peak / 2**30,
    )  # fmt: skip
    return kv


def peak_forward(
    model: torch.nn.Module,
    t: TextConfig,
    num_tokens: int,
    num_logits: int,
    kv_heads: int,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """The largest step the scheduler can build: `num_tokens` rows, `num_logits` logits (none
    on a rank without lm_head). `kv_heads`: the KV heads this rank holds."""
    with torch.inference_mode():
        x = torch.zeros(num_tokens, t.hidden_size, dtype=dtype, device=device)
        positions = torch.arange(num_tokens, device=device).expand(3, -1)
        cache = ContiguousKVCache(t.num_hidden_layers, kv_heads, t.head_dim, num_tokens, dtype,
                                  device)  # fmt: skip
        hidden = model(x, positions, cache)
        if getattr(model, "lm_head", None) is not None:
            model.compute_logits(hidden[:num_logits])  # type: ignore[operator]
