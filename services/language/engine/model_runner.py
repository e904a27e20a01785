"""How a step runs: builds the flattened batch, runs the decoder, samples.

The runner owns every tensor: the decoder, the paged KV storage, each request's prompt inputs
(`input_embeds` with image rows scattered in, `input_deepstack_embeds`, M-RoPE positions) and its
sampling generator. A step's chunks become one forward over their tokens back to back; chunked
prefill slices the prompt inputs and the deepstack rows with the same token range. On CUDA, a
decode-only step replays a captured CUDA graph instead (`cuda_graphs.py`); the last KV block is
then reserved as the graphs' padding block.

With tensor parallelism (`workers`), this runner is rank 0: it holds its part of the decoder and
its KV heads, announces every eager step to the workers and broadcasts its inputs, and all ranks
run the forward together; rank 0 alone samples. Any error in such a step is fatal
(`EngineFailed`): after a failed collective the ranks no longer agree on what comes next.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from common.config import ModelConfig
from services.language.engine.cuda_graphs import DecodeGraphs, DecodeStep, graphs_enabled
from services.language.engine.errors import EngineFailed
from services.language.engine.forward_batch import KVStorage, StepInputs, StepSeq, forward_step
from services.language.engine.prompt_logprobs import collect_prompt_logprobs
from services.language.engine.request import Request
from services.language.engine.sampler import Sample, SampleInput, make_generator, sample_rows
from services.language.engine.scheduler import ScheduledChunk
from services.language.inputs import scatter_images
from services.language.model import Qwen3MoeForCausalLM
from services.language.mrope import mrope_positions

if TYPE_CHECKING:
    from services.language.parallel.workers import Workers

log = logging.getLogger(__name__)


@dataclass
class PromptInputs:
    """A request's prompt, ready for the decoder (built once, sliced by every chunk)."""

    embeds: torch.Tensor  # [P, H]
    deepstack: torch.Tensor | None  # [P, D*H], zeros on text rows
    positions: torch.Tensor  # [3, P]
    rope_delta: int
    generator: torch.Generator | None


class ModelRunner:
    def __init__(
        self,
        cfg: ModelConfig,
        model: Qwen3MoeForCausalLM,
        kv_cache_bytes: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        cuda_graphs: bool = True,
        max_batch: int = 64,
        kv_heads: int | None = None,
        workers: Workers | None = None,
    ) -> None:
        """`cuda_graphs`: capture decode steps of up to `max_batch` sequences (the scheduler's
        `max_num_seqs`) on CUDA with the Triton kernels; ignored elsewhere. `kv_heads`: the KV
        heads this rank holds (default: all); `workers`: ranks 1..N-1 of a tensor-parallel
        replica, whose KV caches get as many blocks as ours."""
        self.workers = workers
        self.cfg, self.model, self.dtype = cfg, model, dtype
        self.device = torch.device(device)
        self._select_device()
        t = cfg.text
        kv_heads = kv_heads or t.num_key_value_heads
        per_block = KVStorage.bytes_per_block(
            t.num_hidden_layers, block_size, kv_heads, t.head_dim, dtype
        )
        # Graph replay would skip the workers' announcement: tensor-parallel steps run eager.
        use_graphs = graphs_enabled(cuda_graphs, self.device) and workers is None
        if workers is not None and graphs_enabled(cuda_graphs, self.device):
            log.info("CUDA graphs off: tensor-parallel steps run eager")
        total_blocks = kv_cache_bytes // per_block
        # Blocks the block manager hands out; with graphs the last one pads graph batches.
        self.num_blocks = total_blocks - 1 if use_graphs else total_blocks
        if self.num_blocks < 2:
            raise ValueError(
                f"kv cache of {kv_cache_bytes} bytes holds {total_blocks} blocks of "
                f"{per_block} bytes; give it more room"
            )
        self.block_size = block_size
        self.storage = KVStorage(
            t.num_hidden_layers, total_blocks, block_size, kv_heads, t.head_dim, dtype,
            self.device,
        )  # fmt: skip
        if workers is not None:
            workers.allocate_kv(total_blocks, block_size)
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB)", total_blocks, block_size,
                 total_blocks * per_block / 2**20)  # fmt: skip
        self.graphs: DecodeGraphs | None = None
        if use_graphs:
            max_blocks = min(self.num_blocks, -(-t.max_position_embeddings // block_size))
            self.graphs = DecodeGraphs(model, self.storage, total_blocks - 1, max_blocks, max_batch)

    @property
    def capacity_tokens(self) -> int:
        """Tokens the KV cache holds in all (what the block manager hands out)."""
        return self.num_blocks * self.block_size

    def _select_device(self) -> None:
        """Make our GPU the calling thread's current device: Triton launches, and graph
        capture creates its stream, on the current device, which is cuda:0 on a new thread
        whatever tensor they are given (`--device cuda:1` would crash without this)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    @torch.inference_mode()
    def prepare(self, req: Request, images: list[torch.Tensor], grids: list[tuple]) -> None:
        """Build `req.payload` from its prompt ids and its images' wire tensors (prompt order;
        a video as one (1, h, w) item per temporal patch)."""
        merge = self.cfg.vision.spatial_merge_size if self.cfg.vision else 2
        image_token = self.cfg.image_token_id if self.cfg.image_token_id is not None else -1
        video = self.cfg.video_token_id  # a video arrives as its temporal patches, in order
        positions, delta = mrope_positions(req.prompt_ids, image_token, grids, merge, video)
        ids = torch.tensor(req.prompt_ids, device=self.device)
        embeds, deepstack = scatter_images(
            self.model.embed(ids), ids, image_token, images, self.cfg.num_deepstack, video
        )
        req.payload = PromptInputs(
            embeds, deepstack, positions.to(self.device), delta,
            make_generator(req.params.seed, self.device),
        )  # fmt: skip

    def prepare_sibling(self, req: Request, first: Request) -> None:
        """`req.payload` for another sequence of `first`'s prompt: the same prompt inputs, its
        own generator (from its own seed)."""
        inp: PromptInputs = first.payload
        req.payload = PromptInputs(inp.embeds, inp.deepstack, inp.positions, inp.rope_delta,
                                   make_generator(req.params.seed, self.device))  # fmt: skip

    def watch(self, on_lost: Callable[[str], None]) -> None:
        """Call `on_lost(reason)` from another thread when a tensor-parallel worker exits."""
        if self.workers is not None:
            self.workers.watch(on_lost)

    def kill_workers(self) -> None:
        """After a failure: end the workers now (a forward waiting on them then fails)."""
        if self.workers is not None:
            self.workers.kill()

    def close(self) -> None:
        """Stop the workers and leave their group (torch thread, no forward in flight)."""
        if self.workers is not None:
            self.workers.close()
            self.workers = None

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> dict[str, Sample]:
        """One forward over the chunks; returns a Sample for each chunk that ends its request's
        known tokens. Raises EngineFailed when a tensor-parallel forward fails."""
        self._select_device()
        replayed = self._replay(chunks) if self.graphs is not None else None
        hidden, last_rows = replayed if replayed is not None else self._eager(chunks)
        if replayed is None and any(c.req.params.prompt_logprobs is not None for c in chunks):
            collect_prompt_logprobs(self.model.compute_logits, hidden, chunks)
        sampling = [(i, c) for i, c in enumerate(chunks) if c.samples]
        if not sampling:
            return {}
        rows = torch.tensor([last_rows[i] for i, _ in sampling])
        logits = self.model.compute_logits(hidden[rows.to(self.device)])
        inputs = [self._sample_input(c.req) for _, c in sampling]
        samples = sample_rows(logits, inputs)
        return {c.req.id: s for (_, c), s in zip(sampling, samples, strict=True)}

    def _eager(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, list[int]]:
        """`_forward`; with workers, any error in it is fatal (sampling after it, on rank 0
        alone, is not: the ranks are in step again once the forward returned)."""
        if self.workers is None:
            return self._forward(chunks)
        try:
            return self._forward(chunks)
        except Exception as e:
            raise EngineFailed(self.workers.explain(e)) from e

    def _forward(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, list[int]]:
        """The eager forward: hidden states `[T, H]` and each chunk's last row."""
        if all(c.length == 1 and c.start >= c.req.num_prompt for c in chunks):
            x, positions, deepstack = self._decode_inputs(chunks)
        else:
            x, positions, deepstack = self._mixed_inputs(chunks)
        seqs, q_start = [], 0
        for c in chunks:
            seqs.append(StepSeq(q_start, c.length, c.start + c.length, c.req.block_table))
            q_start += c.length
        step = StepInputs(x, positions, deepstack, seqs)
        if self.workers is not None:
            self.workers.send_step(step)
        hidden = forward_step(self.model, self.storage, self.block_size, step)
        return hidden, [s.q_start + s.q_len - 1 for s in seqs]

    def _decode_inputs(
        self, chunks: list[ScheduledChunk]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A decode-only step: every row is a generated token (no image rows, so no deepstack:
        adding its zeros would change nothing)."""
        ids, pos = [], []
        for c in chunks:
            req = c.req
            ids.append(req.output_ids[c.start - req.num_prompt])
            pos.append(c.start + req.payload.rope_delta)
        x = self.model.embed(torch.tensor(ids, device=self.device))  # [B, H]
        return x, torch.tensor(pos, device=self.device).expand(3, -1), None

    def _mixed_inputs(
        self, chunks: list[ScheduledChunk]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A step with prompt chunks: each chunk's rows, images and deepstack included."""
        embeds, deepstack_rows, positions = [], [], []
        any_deepstack = any(c.req.payload.deepstack is not None for c in chunks)
        for c in chunks:
            e, d, p = self._chunk_inputs(c.req, c.start, c.length, any_deepstack)
            embeds.append(e)
            if d is not None:
                deepstack_rows.append(d)
            positions.append(p)
        deepstack = torch.cat(deepstack_rows) if any_deepstack else None
        return torch.cat(embeds), torch.cat(positions, dim=1), deepstack

    def _replay(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, list[int]] | None:
        """A decode-only step through the captured graphs: hidden states `[B, H]`, row i = chunk
        i. None when the step is not one: a chunk of more than one token or of a prompt token
        (whose row may carry image embeddings and deepstack), or too many sequences or blocks."""
        assert self.graphs is not None
        if not all(c.length == 1 and c.start >= c.req.num_prompt for c in chunks):
            return None
        if not self.graphs.fits(len(chunks), max(len(c.req.block_table) for c in chunks)):
            return None
        ids, positions, slots, lengths, tables = [], [], [], [], []
        bs = self.block_size
        for c in chunks:
            req = c.req
            ids.append(req.output_ids[c.start - req.num_prompt])
            positions.append(c.start + req.payload.rope_delta)
            slots.append(req.block_table[c.start // bs] * bs + c.start % bs)
            lengths.append(c.start + 1)
            tables.append(req.block_table)
        embeds = self.model.embed(torch.tensor(ids, device=self.device))  # [B, H]
        hidden = self.graphs.run(embeds, DecodeStep(positions, slots, lengths, tables))
        return hidden, list(range(len(chunks)))

    def _chunk_inputs(
        self, req: Request, start: int, length: int, with_deepstack: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Embeddings, deepstack rows and positions of tokens start..start+length-1."""
        inp: PromptInputs = req.payload
        p = req.num_prompt
        end = start + length
        parts_e, parts_d, parts_p = [], [], []
        if start < p:  # prompt tokens: precomputed rows (images included)
            hi = min(end, p)
            parts_e.append(inp.embeds[start:hi])
            parts_p.append(inp.positions[:, start:hi])
            if with_deepstack:
                ds = inp.deepstack
                parts_d.append(ds[start:hi] if ds is not None else self._zeros(hi - start))
        if end > p:  # generated tokens (recomputed after preemption, or the next decode step)
            lo = max(start, p)
            ids = torch.tensor(req.output_ids[lo - p : end - p], device=self.device)
            parts_e.append(self.model.embed(ids))
            pos = torch.arange(lo, end, device=self.device) + inp.rope_delta
            parts_p.append(pos.expand(3, -1))
            if with_deepstack:
                parts_d.append(self._zeros(end - lo))
        deepstack = torch.cat(parts_d) if with_deepstack else None
        return torch.cat(parts_e), deepstack, torch.cat(parts_p, dim=1)

    def _zeros(self, n: int) -> torch.Tensor:
        width = self.cfg.num_deepstack * self.cfg.text.hidden_size
        return torch.zeros(n, width, dtype=self.dtype, device=self.device)

    def _sample_input(self, req: Request) -> SampleInput:
        stop = frozenset(req.params.stop_token_ids) | (
            frozenset() if req.params.ignore_eos else req.eos_token_ids
        )
        return SampleInput(req.params, req.payload.generator, req.prompt_ids, req.output_ids, stop,
                           req.constraint)  # type: ignore[arg-type]  # fmt: skip
