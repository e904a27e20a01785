"""Structured decoding with xgrammar: compiled grammars, per-request matchers, token bitmasks.

`GrammarCompiler` turns a contract `StructuredOutput` into an xgrammar `CompiledGrammar` for this
replica's vocabulary, in a worker thread (never on the engine loop), and keeps the last
`cache_size` of them by the constraint's digest; concurrent compiles of one constraint share
one. A schema, regex or grammar that does not compile raises `ContractError` with xgrammar's
message (the servicer answers INVALID_ARGUMENT, cause request).

`GrammarConstraint` is one sequence's matcher. The sampler asks every constrained row of a step
for its allowed tokens in one batched fill (`fill_bitmasks`: int32 `[N, ceil(V / 32)]` on the
CPU, bit t of row i set = token t allowed) and masks the logits with it on their device
(`apply_bitmask`); the request advances its matcher with each token it appends
(`Request.append_token`), and only then: a preempted request that is recomputed keeps its
matcher as it was, since its recomputed tokens are not appended again. A matcher that has
accepted a stop token, or whose grammar is complete and allows nothing more, is `finished`.

Special tokens that decode to nothing for the client (skipped special tokens) are left out of
the grammar's vocabulary, so they can never be used to spell grammar text; the end-of-sequence
ids are the grammar's stop tokens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import xgrammar as xgr

from common.contract import ConstraintKind, ContractError, StructuredOutput

log = logging.getLogger(__name__)

# One thread for xgrammar's own parallelism: the replica's cores belong to the forward.
_THREADS = 1
_BATCH = xgr.BatchGrammarMatcher(max_threads=_THREADS)


class GrammarCompiler:
    def __init__(self, info: xgr.TokenizerInfo, cache_size: int = 256) -> None:
        self.info = info
        self.vocab_size = info.vocab_size
        self._compiler = xgr.GrammarCompiler(info, max_threads=_THREADS, cache_enabled=False)
        self._cache: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._pending: dict[str, asyncio.Future[xgr.CompiledGrammar]] = {}
        self.compiled_total = 0  # grammars compiled (cache misses), for tests and metrics

    @classmethod
    def from_model_dir(
        cls, model_dir: str | Path, vocab_size: int, stop_token_ids: Sequence[int]
    ) -> GrammarCompiler:
        """The checkpoint's `tokenizer.json`, padded (or cut) to the model's `vocab_size`."""
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(model_dir) / "tokenizer.json"))
        detected = xgr.TokenizerInfo.from_huggingface(
            tok, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids) or None
        )
        vocab = [""] * vocab_size
        for text, i in tok.get_vocab().items():
            if i < vocab_size:
                vocab[i] = text
        for i in tok.all_special_ids:  # blank: xgrammar never allows empty tokens
            if i < vocab_size:
                vocab[i] = ""
        info = xgr.TokenizerInfo(
            vocab,
            detected.vocab_type,
            vocab_size=vocab_size,
            stop_token_ids=list(stop_token_ids) or None,
            add_prefix_space=detected.add_prefix_space,
        )
        return cls(info)

    def cached(self, s: StructuredOutput) -> bool:
        return s.digest in self._cache

    async def compile(self, s: StructuredOutput) -> tuple[xgr.CompiledGrammar, bool]:
        """The compiled grammar and whether it was cached; raises ContractError."""
        key = s.digest
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit, True
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending), True
        future: asyncio.Future[xgr.CompiledGrammar] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            compiled = await asyncio.to_thread(self.compile_now, s)
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        finally:
            del self._pending[key]
        future.set_result(compiled)
        return compiled, False

    def compile_now(self, s: StructuredOutput) -> xgr.CompiledGrammar:
        """Compile in the calling thread (blocking) and cache; raises ContractError."""
        t0 = time.perf_counter()
        try:
            compiled = self._compile(s)
        except (RuntimeError, ValueError, TypeError) as e:
            raise ContractError(_problem(s, e), "structured_outputs") from None
        if not _allows_anything(compiled, self.vocab_size):
            raise ContractError(f"{_name(s)}: no output can match it", "structured_outputs")
        with self._lock:
            self._cache[s.digest] = compiled
            self._cache.move_to_end(s.digest)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            self.compiled_total += 1
        log.debug("compiled %s grammar in %.1f ms", s.kind.value, 1e3 * (time.perf_counter() - t0))
        return compiled

    def _compile(self, s: StructuredOutput) -> xgr.CompiledGrammar:
        c = self._compiler
        if s.kind == ConstraintKind.JSON_SCHEMA:
            schema = json.dumps(_plain_bounded_strings(json.loads(s.spec)))
            return c.compile_json_schema(schema, strict_mode=s.strict, any_whitespace=False)
        if s.kind == ConstraintKind.JSON_OBJECT:
            schema = json.dumps({"type": "object"})
            return c.compile_json_schema(schema, strict_mode=False, any_whitespace=False)
        if s.kind == ConstraintKind.REGEX:
            return c.compile_regex(s.spec)
        if s.kind == ConstraintKind.CHOICE:
            # EBNF string literals take JSON's escapes, so json.dumps quotes any text exactly.
            return c.compile_grammar("root ::= " + " | ".join(json.dumps(x) for x in s.choices))
        return c.compile_grammar(s.spec)

    def constraint(
        self, compiled: xgr.CompiledGrammar, after_token: int | None = None
    ) -> GrammarConstraint:
        return GrammarConstraint(xgr.GrammarMatcher(compiled), after_token)


class GrammarConstraint:
    """One sequence's grammar state (implements `request.TokenConstraint`). With
    `after_token`, it is inactive (masks nothing, accepts anything) until that token is
    accepted: a reasoning model thinks freely and answers under the grammar."""

    def __init__(self, matcher: xgr.GrammarMatcher, after_token: int | None = None) -> None:
        self.matcher = matcher
        self.after_token = after_token
        self.active = after_token is None

    def accept(self, token: int) -> bool:
        if not self.active:
            self.active = token == self.after_token
            return True
        return bool(self.matcher.accept_token(token))

    @property
    def finished(self) -> bool:
        return self.active and bool(self.matcher.is_terminated())


def fill_bitmasks(
    constraints: Sequence[GrammarConstraint], rows: Sequence[int], batch: int, vocab_size: int
) -> torch.Tensor:
    """The allowed tokens of the next step: int32 `[batch, ceil(vocab_size / 32)]` on the CPU,
    row `rows[i]` filled by `constraints[i]` in one batched call, other rows all ones. Pinned
    when CUDA is there, so that its copy to the logits' device is asynchronous."""
    shape = xgr.get_bitmask_shape(batch, vocab_size)
    bitmask = torch.empty(shape, dtype=xgr.bitmask_dtype, pin_memory=torch.cuda.is_available())
    bitmask.fill_(-1)
    _BATCH.batch_fill_next_token_bitmask([c.matcher for c in constraints], bitmask, list(rows))
    return bitmask


def apply_bitmask(scores: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int]) -> None:
    """Set `scores[r, t]` to -inf for each r in `rows` where bit t of `bitmask[r]` is 0, in
    place. `scores` `[N, V]` fp32 and `bitmask` `[N, ceil(V / 32)]` are on the same device:
    xgrammar's kernel on the CPU and CUDA, the same arithmetic in torch ops elsewhere."""
    if scores.device.type in ("cpu", "cuda"):
        vocab = scores.shape[1]
        xgr.apply_token_bitmask_inplace(scores, bitmask, vocab_size=vocab, indices=list(rows))
        return
    apply_bitmask_torch(scores, bitmask, rows)


def apply_bitmask_torch(scores: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int]) -> None:
    """`apply_bitmask` in plain torch ops, for any device."""
    vocab = scores.shape[1]
    index = torch.tensor(list(rows), dtype=torch.long, device=scores.device)
    words = bitmask.index_select(0, index)  # [R, W]
    shifts = torch.arange(32, dtype=bitmask.dtype, device=bitmask.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1  # [R, W, 32]
    allowed = bits.reshape(words.shape[0], -1)[:, :vocab].bool()  # [R, V]
    picked = scores.index_select(0, index)
    scores.index_copy_(0, index, picked.masked_fill(~allowed, float("-inf")))


# Values inside a schema that are data, not schemas: left as they are.
_DATA_KEYS = frozenset({"enum", "const", "default", "examples", "example"})


def _plain_bounded_strings(schema: Any) -> Any:
    """The schema with every length-bounded string (`minLength`/`maxLength`, no pattern or
    format) given as a pattern of plain characters instead. xgrammar 0.2.8 compiles such a
    string to characters that include the control characters U+0000-U+001F, which JSON does
    not allow unescaped (the output would not parse); the pattern excludes them, and quotes and
    backslashes (so these strings carry no escapes)."""
    if isinstance(schema, list):
        return [_plain_bounded_strings(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _DATA_KEYS else _plain_bounded_strings(v) for k, v in schema.items()}
    lo, hi = out.get("minLength", 0), out.get("maxLength", "")
    bounded = "minLength" in out or "maxLength" in out
    valid = _is_count(lo) and (hi == "" or (_is_count(hi) and hi >= lo))
    if out.get("type") == "string" and bounded and valid and not {"pattern", "format"} & out.keys():
        out.pop("minLength", None)
        out.pop("maxLength", None)
        out["pattern"] = f'^[^\\x00-\\x1f"\\\\]{{{lo},{hi}}}$'
    return out


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _problem(s: StructuredOutput, e: Exception) -> str:
    """xgrammar's message without its source-location prefix, named after the constraint."""
    text = str(e).strip()
    for marker in (".cc:", ".h:"):
        at = text.find(marker)
        if at >= 0:
            text = text[text.find(" ", at) + 1 :]
            break
    return f"invalid {_name(s)}: {text.splitlines()[0] if text else type(e).__name__}"


def _name(s: StructuredOutput) -> str:
    return {ConstraintKind.JSON_SCHEMA: "json schema", ConstraintKind.JSON_OBJECT: "json object",
            ConstraintKind.REGEX: "regex", ConstraintKind.CHOICE: "choice",
            ConstraintKind.GRAMMAR: "grammar"}[s.kind]  # fmt: skip


def _allows_anything(compiled: xgr.CompiledGrammar, vocab_size: int) -> bool:
    """Whether a fresh matcher allows some first token (an empty language allows none: every
    request with it would be refused at its first step)."""
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    xgr.GrammarMatcher(compiled).fill_next_token_bitmask(bitmask)
    return bool(bitmask.any())
