"""Under `epd up`'s core share (`common.cores`) a running forward gives a core up between two
layers as soon as another role claims one, and takes it back when that role is done: the
vision tower and the decoder both claim again at every layer."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

import torch

from common.config import ModelConfig
from common.contract import SamplingParams
from common.cores import CoreShare, create_ledger, rebalance
from common.tokenizer import ChatTokenizer
from services.encoder.weights import load_vision_tower
from services.language.engine.engine import Engine
from services.language.engine.model_runner import ModelRunner
from services.language.engine.scheduler import SchedulerConfig
from services.language.weights import load_decoder

CORES = 4


def _shares(tmp_path, mine: int) -> tuple[CoreShare, CoreShare, list[int]]:
    """(this role's share, the other role's, the thread counts this role was given)."""
    ledger = tmp_path / "cores"
    create_ledger(ledger, 2)
    given: list[int] = []
    other = CoreShare(ledger, 1 - mine, CORES, lambda n: None)
    return CoreShare(ledger, mine, CORES, given.append), other, given


@contextlib.contextmanager
def _other_role_busy_during(layers: torch.nn.ModuleList, other: CoreShare) -> Iterator[None]:
    """The other role (on a thread of its own, as it would be in its own process) starts a
    forward before layer 1 and ends it before layer 2, during the first forward only."""
    started, done = threading.Event(), threading.Event()

    def busy() -> None:
        with other.forward():
            started.set()
            done.wait(30)

    role = threading.Thread(target=busy)

    def before_1(*_: object) -> None:
        if not started.is_set():
            role.start()
            started.wait(30)

    def before_2(*_: object) -> None:
        done.set()
        if started.is_set():
            role.join(30)

    hooks = [layers[1].register_forward_pre_hook(before_1),
             layers[2].register_forward_pre_hook(before_2)]  # fmt: skip
    try:
        yield
    finally:
        done.set()
        if role.is_alive() or started.is_set():
            role.join(30)
        for h in hooks:
            h.remove()


def test_rebalance_outside_a_shared_forward_does_nothing(tmp_path):
    mine, other, given = _shares(tmp_path, 0)
    rebalance()  # no forward has run on this thread: nothing to claim
    with mine.forward() as n:
        assert n == 4
    rebalance()  # that forward has ended: its share must not claim again
    assert other.held_by_others() == 0  # this role's slot stays free
    assert given == [4]


def test_the_tower_gives_a_core_up_mid_forward_and_takes_it_back(tmp_path, tiny_model):
    cfg = ModelConfig.from_dir(tiny_model)
    tower = load_vision_tower(tiny_model, cfg)
    assert len(tower.blocks) >= 4
    mine, other, given = _shares(tmp_path, 0)
    pixels = torch.randn(16, tower.patch_embed.proj.weight[0].numel())
    with _other_role_busy_during(tower.blocks, other), mine.forward(), torch.inference_mode():
        tower(pixels, [(1, 4, 4)])
    # alone at the start (4); the other role took one before block 1, so block 2 ran on 3; it
    # gave it back before block 2 ran, so block 3 on ran on 4 again (the tower claims before
    # each block, ahead of its hooks)
    assert given == [4, 3, 4]
    assert mine.held_by_others() == 0 and other.held_by_others() == 0


def test_the_decoder_gives_a_core_up_mid_step_and_takes_it_back(tmp_path, tiny_model):
    cfg = ModelConfig.from_dir(tiny_model)
    decoder = load_decoder(tiny_model, cfg)
    assert len(decoder.model.layers) >= 4
    mine, other, given = _shares(tmp_path, 1)
    runner = ModelRunner(cfg, decoder, 4 << 20, block_size=16)
    tokenizer = ChatTokenizer(tiny_model)
    prompt = tokenizer.encode("the quick brown fox jumps over the lazy dog")
    eos = frozenset(tokenizer.eos_token_ids)
    engine = Engine(cfg, runner, SchedulerConfig(), eos, cores=mine)

    async def run() -> list[int]:
        await engine.start()
        try:
            out = []
            async for ev in engine.generate(prompt, SamplingParams(max_tokens=3)):
                if ev.sample is not None:
                    out.append(ev.sample.token)
            return out
        finally:
            await engine.stop()

    with _other_role_busy_during(decoder.model.layers, other):
        tokens = asyncio.run(run())
    assert len(tokens) == 3
    assert given == [4, 3, 4]  # the first step: 4, 3 for layer 2, 4 from layer 3 on; then 4
    assert mine.held_by_others() == 0 and other.held_by_others() == 0
