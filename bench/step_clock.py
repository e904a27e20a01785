"""Synchronous timers inside one engine step, attached from outside the model.

CPU torch ops run synchronously on the calling thread, so wall-clock time between a module's
forward pre-hook and its forward hook is that module's cost. `StepClock.attach(model)` registers
those hooks (a public torch API; the model code is unchanged) on the decoder's parts and wraps
the attention backend the runner passes in, so one call of `ModelRunner.run` yields:

    inputs        run() start -> decoder entered: step inputs, KV slots, attention metadata
                  (embedding of new tokens inside it is reported apart)
    forward parts per layer, summed over layers (see COMPONENTS)
    logits        final norm + lm_head
    sampling      lm_head done -> run() returns

Times nest (q_proj inside self_attn inside the layer), so `StepClock.components` turns inclusive
times into exclusive ones: "rope + reshapes" is self_attn minus its projections, norms and the
attention call; "layer rest" is the layer minus attention, input norm and MLP (the fused
post-attention add + norm and the residual add, which are not module calls). With the C++ CPU
kernels the q/k norms run inside the rotary kernel, not as module calls: "q/k norms" is then 0
and their time is in "rope + reshapes".
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from services.language.model import DecoderLayer, Qwen3MoeForCausalLM, SparseMoeBlock

# Exclusive components of one step, in report order.
COMPONENTS = (
    "inputs + metadata",
    "embedding",
    "attn input norm",
    "q/k/v projections",
    "q/k norms",
    "rope + reshapes",
    "kv write + paged attention",
    "o projection",
    "layer rest (add+norm, residual)",
    "moe router",
    "expert GEMMs (sort, gather, combine)",
    "mlp rest (dense MLP / MoE block call)",
    "decoder rest (rope tables, deepstack)",
    "final norm + lm_head",
    "sampling",
)


class _TimedBackend:
    """The runner's attention backend with each `attend` call timed (KV write + kernel)."""

    def __init__(self, inner: Any, add: Callable[[str, float], None]) -> None:
        self.inner, self.add = inner, add

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.inner.attend(layer, q, k, v, scale)
        self.add("attend", time.perf_counter() - t0)
        return out  # type: ignore[no-any-return]


class StepClock:
    def __init__(self) -> None:
        self.inclusive: dict[str, float] = defaultdict(float)
        self.marks: dict[str, float] = {}
        self._open: dict[int, float] = {}
        self._handles: list[Any] = []

    def add(self, name: str, seconds: float) -> None:
        self.inclusive[name] += seconds

    def reset(self) -> None:
        self.inclusive.clear()
        self.marks.clear()

    def attach(self, model: Qwen3MoeForCausalLM) -> None:
        """Hooks on the decoder's parts; `detach()` removes them."""
        inner = model.model
        self._time(inner.embed_tokens, "embedding")
        for layer in inner.layers:
            assert isinstance(layer, DecoderLayer)
            attn = layer.self_attn
            self._time(layer, "layer")
            self._time(layer.input_layernorm, "attn input norm")
            self._time(attn, "self_attn")
            fused = attn.qkv_proj
            for proj in (fused,) if fused is not None else (attn.q_proj, attn.k_proj, attn.v_proj):
                self._time(proj, "q/k/v projections")
            self._time(attn.o_proj, "o projection")
            self._time(attn.q_norm, "q/k norms")
            self._time(attn.k_norm, "q/k norms")
            self._time(layer.mlp, "mlp")
            if isinstance(layer.mlp, SparseMoeBlock):
                self._time(layer.mlp.gate, "moe router")
                self._time(layer.mlp.experts, "expert GEMMs (sort, gather, combine)")
        self._time(inner.norm, "final norm")
        self._time(model.lm_head, "lm_head")

        def enter_decoder(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            self.marks["decoder_in"] = time.perf_counter()
            x, positions, backend, *rest = args
            return (x, positions, _TimedBackend(backend, self.add), *rest)

        def leave_decoder(_m: nn.Module, _args: Any, _out: Any) -> None:
            self.marks["decoder_out"] = time.perf_counter()

        self._handles.append(model.register_forward_pre_hook(enter_decoder))
        self._handles.append(model.register_forward_hook(leave_decoder))

        def logits_done(_m: nn.Module, _args: Any, _out: Any) -> None:
            self.marks["logits_out"] = time.perf_counter()

        self._handles.append(model.lm_head.register_forward_hook(logits_done))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _time(self, module: nn.Module, name: str) -> None:
        key = id(module)

        def pre(_m: nn.Module, _args: Any) -> None:
            self._open[key] = time.perf_counter()

        def post(_m: nn.Module, _args: Any, _out: Any) -> None:
            self.inclusive[name] += time.perf_counter() - self._open.pop(key)

        self._handles.append(module.register_forward_pre_hook(pre))
        self._handles.append(module.register_forward_hook(post))

    def components(self, run_start: float, run_end: float) -> dict[str, float]:
        """Exclusive seconds per component of the step whose `run()` spanned these times."""
        t, m = self.inclusive, self.marks
        moe = t["moe router"] + t["expert GEMMs (sort, gather, combine)"]
        attn_parts = t["q/k/v projections"] + t["q/k norms"] + t["o projection"] + t["attend"]
        decoder = m["decoder_out"] - m["decoder_in"]
        return {
            # new tokens are embedded while the inputs are built, before the decoder runs
            "inputs + metadata": m["decoder_in"] - run_start - t["embedding"],
            "embedding": t["embedding"],
            "attn input norm": t["attn input norm"],
            "q/k/v projections": t["q/k/v projections"],
            "q/k norms": t["q/k norms"],
            "rope + reshapes": t["self_attn"] - attn_parts,
            "kv write + paged attention": t["attend"],
            "o projection": t["o projection"],
            "layer rest (add+norm, residual)": t["layer"]
            - t["self_attn"]
            - t["attn input norm"]
            - t["mlp"],
            "moe router": t["moe router"],
            "expert GEMMs (sort, gather, combine)": t["expert GEMMs (sort, gather, combine)"],
            "mlp rest (dense MLP / MoE block call)": t["mlp"] - moe,
            "decoder rest (rope tables, deepstack)": decoder - t["layer"],
            # The gap between the decoder and the final norm (picking the rows to sample) is
            # step glue; it goes with the logits.
            "final norm + lm_head": m["logits_out"] - m["decoder_out"],
            "sampling": run_end - m["logits_out"],
        }
