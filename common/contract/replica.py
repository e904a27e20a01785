"""What a language replica serves, and the context budget of one request on it (pure Python)."""

from __future__ import annotations

from dataclasses import dataclass

from common.contract.sampling import ContractError


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    """A language replica as `GetInfo` describes it; callers cache it per replica."""

    model_type: str  # "qwen3_vl_moe", "qwen3_vl" or "qwen3_moe"
    # Tokens one sequence may hold, prompt and output together: min(the checkpoint's context,
    # --max-model-len, what the KV cache holds), computed once at start-up.
    max_model_len: int
    host_id: str  # `common.transfer.host_id()`: encoders on this host may use shared memory
    block_size: int  # tokens per KV block (prefix-cache granularity)
    vocab_size: int


def resolve_max_tokens(
    prompt_tokens: int, max_tokens: int | None, max_model_len: int, min_tokens: int = 0
) -> int:
    """The request's output budget: `max_tokens`, or all the room the context leaves when it is
    None. Raises ContractError naming both numbers when the request does not fit."""
    room = max_model_len - prompt_tokens
    if room <= 0:
        raise ContractError(
            f"This model's maximum context length is {max_model_len} tokens, and the prompt "
            f"alone is {prompt_tokens} tokens, which leaves no room for output. Please reduce "
            "the length of the messages.",
            "messages",
        )
    if max_tokens is None:
        budget = room
    elif max_tokens > room:
        raise ContractError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
            f"{max_tokens} in the completion). Please reduce the length of the messages or "
            "completion.",
            "max_tokens",
        )
    else:
        budget = max_tokens
    if min_tokens > budget:
        raise ContractError(
            f"min_tokens ({min_tokens}) exceeds the {budget} tokens this request may generate",
            "min_tokens",
        )
    return budget
