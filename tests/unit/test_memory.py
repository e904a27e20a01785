"""max_model_len and KV sizing: computed once, and a misfit names the flag to change."""

from __future__ import annotations

import pytest

from common.contract import ContractError, resolve_max_tokens
from services.language.engine.memory import kv_bytes_from_memory, resolve_max_model_len


def test_max_model_len_is_the_least_of_context_flag_and_cache():
    assert resolve_max_model_len(262_144, None, 65_536) == 65_536  # a real checkpoint's context
    assert resolve_max_model_len(4096, None, 65_536) == 4096
    assert resolve_max_model_len(262_144, 8192, 65_536) == 8192
    with pytest.raises(ValueError, match="--kv-cache-bytes"):
        resolve_max_model_len(262_144, 100_000, 65_536)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        resolve_max_model_len(4096, 8192, 65_536)


def test_default_max_tokens_is_the_room_the_context_leaves():
    assert resolve_max_tokens(17, None, 65_536) == 65_519
    assert resolve_max_tokens(17, 100, 65_536) == 100
    with pytest.raises(ContractError, match="65536 tokens.*17 in the messages, 65530"):
        resolve_max_tokens(17, 65_530, 65_536)
    with pytest.raises(ContractError, match="prompt alone is 70000 tokens"):
        resolve_max_tokens(70_000, None, 65_536)


def test_kv_bytes_from_device_memory_as_vllm_counts_it():
    gib = 1 << 30
    # 80 GiB device, 0.9 of it ours, 60 GiB in use after the weights, a 2 GiB forward peak.
    assert kv_bytes_from_memory(80 * gib, 20 * gib, 0.9, 2 * gib) == int(72 * gib) - 62 * gib
    with pytest.raises(ValueError, match="--gpu-memory-utilization"):
        kv_bytes_from_memory(80 * gib, 5 * gib, 0.9, 2 * gib)
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        kv_bytes_from_memory(80 * gib, 20 * gib, 1.5, 0)
