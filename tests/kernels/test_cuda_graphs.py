"""The CUDA-graph decode path without a GPU: bucket choice, the padded static-buffer forward (the
region that gets captured) against the eager torch path, and graph-safety of that region (no
op that reads device data back to the host). Capture and replay themselves run in tests/gpu."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common.config import ModelConfig
from services.language import kernels
from services.language.engine import cuda_graphs
from services.language.engine.cuda_graphs import DecodeGraphs, bucket_for, graph_batch_sizes
from services.language.engine.kv_cache import BlockManager
from services.language.engine.model_runner import ModelRunner
from services.language.engine.request import Request, SamplingParams
from services.language.engine.scheduler import Scheduler, SchedulerConfig
from services.language.kernels.triton_moe import moe_align
from services.language.weights import load_decoder
from tests.kernels.conftest import DEVICE, rel_err

# Ops that wait for the device and read its data on the host, or (boolean-mask indexing, which
# calls nonzero) give a shape that depends on data. None may run inside a captured graph.
HOST_SYNC_OPS = {
    "aten.bincount.default", "aten.nonzero.default", "aten._local_scalar_dense.default",
    "aten.item.default", "aten.masked_select.default", "aten.unique_consecutive.default",
    "aten._unique2.default", "aten.repeat_interleave.Tensor", "aten.equal.default",
    # torch.tensor(python data): an upload from the host, which a graph would freeze as it was
    # at capture time.
    "aten.lift_fresh.default",
}  # fmt: skip


class SyncRecorder(TorchDispatchMode):
    """Records every op that would read device data back to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name.startswith(("aten.index.", "aten.index_put")) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for i in (args[1] if len(args) > 1 and isinstance(args[1], list | tuple) else [])
        )
        if name in HOST_SYNC_OPS or bool_index:
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


def test_batch_sizes_and_buckets() -> None:
    assert graph_batch_sizes(64) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
    assert graph_batch_sizes(10) == (1, 2, 4, 8, 10)  # the maximum itself is always captured
    assert graph_batch_sizes(3) == (1, 2, 3)
    assert graph_batch_sizes(1) == (1,)
    sizes = graph_batch_sizes(20)
    assert sizes == (1, 2, 4, 8, 16, 20)
    assert [bucket_for(n, sizes) for n in (1, 3, 5, 8, 9, 17, 20)] == [1, 4, 8, 8, 16, 20, 20]
    assert bucket_for(21, sizes) is None
    with pytest.raises(ValueError, match="positive"):
        graph_batch_sizes(0)


def test_graphs_only_on_cuda_with_triton(monkeypatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(cuda_graphs.ENV_VAR, raising=False)
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert not cuda_graphs.graphs_enabled(True, cpu)  # CPU behaviour is unchanged
    assert cuda_graphs.graphs_enabled(True, cuda)
    assert not cuda_graphs.graphs_enabled(False, cuda)
    monkeypatch.setenv(cuda_graphs.ENV_VAR, "0")
    assert not cuda_graphs.graphs_enabled(True, cuda)  # the env overrides the flag both ways
    monkeypatch.setenv(cuda_graphs.ENV_VAR, "1")
    assert cuda_graphs.graphs_enabled(False, cuda)
    monkeypatch.setenv(kernels.ENV_VAR, "torch")  # the reference MoE syncs: never captured
    assert not cuda_graphs.graphs_enabled(True, cuda)
    monkeypatch.setenv(cuda_graphs.ENV_VAR, "yes")
    with pytest.raises(ValueError, match="EPD_CUDA_GRAPHS"):
        cuda_graphs.graphs_enabled(True, cuda)


@pytest.mark.parametrize("block_m", [16, 64])
def test_moe_align_is_graph_safe_and_matches_bincount(block_m) -> None:
    """The alignment issues no host-syncing op, and its layout is the one bincount counts give."""
    torch.manual_seed(block_m)
    t, e, k = 24, 16, 4
    experts = torch.stack([torch.randperm(e)[:k] for _ in range(t)]).to(DEVICE)
    with SyncRecorder() as rec:
        sorted_ids, block_expert, num_padded = moe_align(experts, e, block_m)
    assert rec.syncs == []
    n = t * k
    counts = torch.bincount(experts.flatten().cpu(), minlength=e)
    padded = (counts + block_m - 1) // block_m * block_m
    assert int(num_padded) == int(padded.sum())
    # Worst case for n rows: fixed by the shapes, whatever the routing.
    assert sorted_ids.numel() == -(-(n + min(e, n) * (block_m - 1)) // block_m) * block_m
    flat, ids, start = experts.flatten().cpu(), sorted_ids.cpu(), 0
    for expert in range(e):  # each expert's rows, in order, then sentinel padding
        rows = torch.nonzero(flat == expert).flatten().to(torch.int32)
        assert torch.equal(ids[start : start + len(rows)], rows)
        assert (ids[start + len(rows) : start + int(padded[expert])] == n).all()
        assert (block_expert.cpu()[start // block_m : (start + int(padded[expert])) // block_m]
                == expert).all()  # fmt: skip
        start += int(padded[expert])


def _setup(model_dir, graphs: bool, block: int = 4):
    """A runner (eager, torch kernels) and a scheduler; with `graphs`, the static-buffer path
    without capture, its pad block withheld from the block manager as the CUDA runner does."""
    cfg = ModelConfig.from_dir(model_dir)
    runner = ModelRunner(cfg, load_decoder(model_dir, cfg), 1 << 20, block_size=block)
    assert runner.graphs is None  # CPU: never enabled
    usable = runner.num_blocks
    if graphs:
        usable -= 1
        runner.graphs = DecodeGraphs(runner.model, runner.storage, usable, usable, 8, False)
    blocks = BlockManager(usable, block, cfg.image_token_id)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_batch_tokens=256), blocks)
    reqs = []
    for i, n in enumerate((5, 8, 11)):  # 8: the first generated token opens a new block
        req = Request(f"r{i}", [(7 * i + j) % 280 + 20 for j in range(n)], SamplingParams(4))
        runner.prepare(req, [], [])
        sched.add(req)
        reqs.append(req)
    return runner, sched, reqs


def test_padded_decode_matches_eager(tiny_model, monkeypatch) -> None:
    """Three sequences padded to the bucket of 4 through the static buffers (Triton attention
    over block tables, Triton MoE over the padded rows) give the eager torch path's hidden
    states and greedy tokens; the captured region issues no host-syncing op."""
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    eager_runner, eager_sched, eager_reqs = _setup(tiny_model, graphs=False)
    runner, sched, reqs = _setup(tiny_model, graphs=True)
    assert runner.graphs is not None
    region_ops: list[str] = []  # what the captured region itself issued, with Triton kernels
    region_runs: list[int] = []
    captured = runner.graphs._forward

    def recorded(bs: int) -> None:
        if os.environ.get(kernels.ENV_VAR) != "triton":  # CPU reference kernels: not captured
            return captured(bs)
        with SyncRecorder() as inner:
            captured(bs)
        region_ops.extend(inner.syncs)
        region_runs.append(bs)

    monkeypatch.setattr(runner.graphs, "_forward", recorded)
    decode_steps = 0
    while sched.has_work:
        chunks, eager_chunks = sched.schedule(), eager_sched.schedule()
        assert [(c.start, c.length) for c in chunks] == [(c.start, c.length) for c in eager_chunks]
        if all(c.length == 1 for c in chunks):
            decode_steps += 1
            ref, last = eager_runner._forward(eager_chunks)
            monkeypatch.setenv(kernels.ENV_VAR, "triton")
            with SyncRecorder() as rec:
                replayed = runner._replay(chunks)
            monkeypatch.delenv(kernels.ENV_VAR)
            assert replayed is not None and replayed[0].shape[0] == len(chunks) == 3
            assert rel_err(replayed[0], ref[last]) < 1e-5
            # Around the region only host-side inputs are built (tensors from Python data);
            # the region itself issues nothing that syncs or reads host data.
            assert set(rec.syncs) <= {"aten.lift_fresh.default"}
            assert region_ops == [] and region_runs[-1] == 4
            # Padding rows read and wrote the pad block only.
            graphs = runner.graphs
            assert (graphs.slot_mapping[3:4] == graphs.pad_slot).all()
            assert (graphs.lengths[3:4] == 1).all()
        samples, eager_samples = runner.run(chunks), eager_runner.run(eager_chunks)
        assert {k: s.token for k, s in samples.items()} == {
            k: s.token for k, s in eager_samples.items()
        }
        sched.postprocess(chunks, {k: s.token for k, s in samples.items()})
        eager_sched.postprocess(eager_chunks, {k: s.token for k, s in eager_samples.items()})
    assert decode_steps == 3
    assert [r.output_ids for r in reqs] == [r.output_ids for r in eager_reqs]
    assert runner.graphs.num_replays == 0  # nothing captured on the CPU


def test_prefill_and_prompt_tokens_stay_eager(tiny_model) -> None:
    runner, sched, _ = _setup(tiny_model, graphs=True)
    chunks = sched.schedule()  # the prompts' prefill
    assert runner._replay(chunks) is None
