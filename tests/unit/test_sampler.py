"""Sampling on a toy vocabulary: each knob does what it says, seeds reproduce."""

from __future__ import annotations

from collections import Counter

import torch

from common.contract import SamplingParams
from services.language.engine.sampler import (
    SampleInput,
    make_generator,
    process_logits,
    sample_rows,
)

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])


def draw(n: int, seed: int = 0, output_ids=(), prompt_ids=(), stop=frozenset(), **kw) -> Counter:
    params = SamplingParams(max_tokens=100, seed=seed, **kw)
    gen = make_generator(seed, torch.device("cpu"))
    row = SampleInput(params, gen, list(prompt_ids), list(output_ids), frozenset(stop))
    return Counter(sample_rows(LOGITS.clone(), [row])[0].token for _ in range(n))


def test_greedy_takes_the_argmax():
    assert draw(5, temperature=0.0) == Counter({0: 5})


def test_temperature_sampling_follows_softmax():
    n = 6000
    counts = draw(n, temperature=0.7)
    expected = torch.softmax(LOGITS[0] / 0.7, dim=-1)
    for token, p in enumerate(expected.tolist()):
        assert abs(counts[token] / n - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-3


def test_top_k_and_top_p_and_min_p_restrict_the_support():
    assert set(draw(2000, temperature=1.0, top_k=2)) == {0, 1}
    # softmax mass: 0.57, 0.21, 0.13, ... -> top_p 0.7 keeps the first two
    assert set(draw(2000, temperature=1.0, top_p=0.7)) == {0, 1}
    # min_p 0.2: keep tokens with prob >= 0.2 * 0.56 = 0.11
    assert set(draw(2000, temperature=1.0, min_p=0.2)) == {0, 1, 2}


def test_same_seed_same_draws_different_seed_different_draws():
    a = [draw(1, seed=s, temperature=1.0) for s in range(20)]
    b = [draw(1, seed=s, temperature=1.0) for s in range(20)]
    assert a == b and len({tuple(c) for c in a}) > 1


def test_penalties_and_min_tokens():
    # A strong repetition penalty on token 0 (seen in the prompt) makes token 1 the argmax.
    assert draw(1, prompt_ids=[0], repetition_penalty=10.0) == Counter({1: 1})
    assert draw(1, output_ids=[0, 0], frequency_penalty=1.0) == Counter({1: 1})
    assert draw(1, output_ids=[0], presence_penalty=2.0) == Counter({1: 1})
    # min_tokens bans stop ids until reached.
    assert draw(1, stop={0}, min_tokens=3, output_ids=[4]) == Counter({1: 1})
    assert draw(1, stop={0}, min_tokens=1, output_ids=[4]) == Counter({0: 1})


def test_logprobs_come_from_the_raw_distribution():
    params = SamplingParams(max_tokens=4, logprobs=3)
    sample = sample_rows(LOGITS, [SampleInput(params, None, [], [], frozenset())])[0]
    ref = torch.log_softmax(LOGITS[0], dim=-1)
    assert sample.token == 0 and abs(sample.logprob - ref[0].item()) < 1e-6
    assert [t for t, _ in sample.top_logprobs] == [0, 1, 2]


def test_every_sampling_tensor_follows_the_logits_device():
    """Penalties, counts and bans are built on the logits' device. On `meta` logits, any tensor
    the sampler made on the CPU and fed to an op is caught (a CUDA batch would fail on it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class DeviceCheck(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            flat = [*args, *(kwargs or {}).values()]
            flat += [x for a in args if isinstance(a, list | tuple) for x in a]
            for a in flat:
                if isinstance(a, torch.Tensor) and a.dim() > 0:
                    assert a.device.type == "meta", f"{func}: a {a.device} tensor"
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    logits = torch.empty(3, 50, device="meta")
    rows = [
        SampleInput(SamplingParams(repetition_penalty=1.3), None, [1, 2], [3], frozenset({0})),
        SampleInput(
            SamplingParams(presence_penalty=0.5, frequency_penalty=0.7),
            None,
            [4],
            [5, 5, 6],
            frozenset(),
        ),
        SampleInput(SamplingParams(min_tokens=4), None, [7], [8], frozenset({0, 9})),
    ]
    check = DeviceCheck()
    with check:
        scores = process_logits(logits, rows)
    assert scores.device.type == "meta" and len(check.ops) > 10


def test_batched_penalties_equal_one_row_at_a_time():
    torch.manual_seed(0)
    logits = torch.randn(4, 30)
    rows = [
        SampleInput(SamplingParams(repetition_penalty=1.7), None, [1, 2, 2], [3], frozenset()),
        SampleInput(SamplingParams(), None, [1], [2], frozenset()),
        SampleInput(
            SamplingParams(frequency_penalty=1.0, presence_penalty=-0.5),
            None,
            [],
            [4, 4, 29],
            frozenset(),
        ),
        SampleInput(SamplingParams(min_tokens=3), None, [], [5], frozenset({0, 7})),
    ]
    together = process_logits(logits, rows)
    for i, row in enumerate(rows):
        assert torch.equal(together[i], process_logits(logits[i : i + 1], [row])[0])
    assert together[3, 0] == float("-inf") and together[3, 7] == float("-inf")
    assert together[2, 4] == logits[2, 4] - 2.0 + 0.5


def test_degenerate_rows_never_fail_the_batch():
    """A denormal temperature is greedy (it would overflow the scores to inf), and a row whose
    distribution has no mass left takes its argmax: neither may fail the step's other rows."""
    logits = torch.tensor([[2.0, 1.0, 0.5], [0.0, 3.0, 1.0]])
    tiny = SampleInput(SamplingParams(temperature=3.4e-39), None, [], [], frozenset())
    assert tiny.params.greedy
    overflow = SampleInput(SamplingParams(temperature=1e-4), make_generator(1, torch.device("cpu")),
                           [], [], frozenset())  # fmt: skip
    assert [s.token for s in sample_rows(logits.clone() * 1e35, [tiny, overflow])] == [0, 1]


def _constraint(spec):
    import xgrammar as xgr

    from services.language.engine.grammar import GrammarCompiler, GrammarConstraint

    vocab = [f"t{i}" for i in range(50)]
    vocab[7], vocab[8], vocab[9] = "a", "b", "ab"
    info = xgr.TokenizerInfo(vocab, vocab_size=50, stop_token_ids=[0])
    compiler = GrammarCompiler(info)
    return GrammarConstraint(xgr.GrammarMatcher(compiler.compile_now(spec)))


def test_grammar_bitmask_follows_the_logits_device():
    """The bitmask is filled on the host (xgrammar's matchers write host memory) and copied to
    the logits' device once; everything else happens there. On `meta` logits, the only ops that
    see a CPU tensor are the host bitmask's allocation, its fill and that one copy."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from common.contract import ConstraintKind, StructuredOutput

    host_ops = {"aten.empty.memory_format", "aten.fill_.Scalar", "aten._to_copy.default"}

    class DeviceCheck(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.host: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            flat = [*args, *(kwargs or {}).values()]
            flat += [x for a in args if isinstance(a, list | tuple) for x in a]
            out = func(*args, **(kwargs or {}))
            touched = [a for a in [*flat, out] if isinstance(a, torch.Tensor) and a.dim() > 0]
            if any(a.device.type != "meta" for a in touched):
                self.host.append(str(func))
            return out

    spec = StructuredOutput(ConstraintKind.CHOICE, choices=("ab", "b"))
    rows = [
        SampleInput(SamplingParams(), None, [1], [], frozenset(), _constraint(spec)),
        SampleInput(SamplingParams(repetition_penalty=1.2), None, [1], [2], frozenset()),
        SampleInput(SamplingParams(min_tokens=2), None, [1], [], frozenset({0}), _constraint(spec)),
    ]
    check = DeviceCheck()
    with check:
        scores = process_logits(torch.empty(3, 50, device="meta"), rows)
    assert scores.device.type == "meta"
    assert set(check.host) <= host_ops and check.host.count("aten._to_copy.default") == 1


def test_grammar_bitmask_keeps_exactly_the_allowed_tokens_and_wins_over_min_tokens():
    from common.contract import ConstraintKind, StructuredOutput
    from services.language.engine.grammar import apply_bitmask, apply_bitmask_torch, fill_bitmasks

    spec = StructuredOutput(ConstraintKind.CHOICE, choices=("ab", "b"))
    c = _constraint(spec)
    torch.manual_seed(0)
    logits = torch.randn(2, 50)
    rows = [SampleInput(SamplingParams(), None, [], [], frozenset()),
            SampleInput(SamplingParams(temperature=1.0), make_generator(3, torch.device("cpu")),
                        [], [], frozenset(), c)]  # fmt: skip
    scores = process_logits(logits, rows)
    allowed = {t for t in range(50) if torch.isfinite(scores[1, t])}
    assert allowed == {7, 8, 9}  # "a", "b", "ab": the starts of a choice
    assert torch.equal(scores[0], logits[0])  # the unconstrained neighbour untouched
    # The CPU kernel (xgrammar's) and the torch arithmetic other devices use agree.
    mask = fill_bitmasks([c], [1], 2, 50)
    a, b = logits.clone(), logits.clone()
    apply_bitmask(a, mask, [1])
    apply_bitmask_torch(b, mask, [1])
    assert torch.equal(a, b) and torch.equal(a[1], scores[1])
    # After "a", only "b" continues; then the grammar wants to stop, which min_tokens bans:
    # the grammar wins (a stop id), rather than a row with nothing left.
    assert c.accept(7) and c.accept(8)
    done = SampleInput(SamplingParams(min_tokens=5), None, [], [7, 8], frozenset({0}), c)
    assert sample_rows(logits[:1].clone(), [done])[0].token == 0
