"""How a step runs: builds the flattened batch, runs the decoder, samples.

The runner owns every tensor: the decoder, the paged KV storage, each request's prompt inputs
(`input_embeds` with image rows scattered in, `input_deepstack_embeds`, M-RoPE positions) and its
sampling generator. A step's chunks become one forward over their tokens back to back; chunked
prefill slices the prompt inputs and the deepstack rows with the same token range.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from common.config import ModelConfig
from services.language.engine.forward_batch import ForwardBatch, KVStorage
from services.language.engine.request import Request
from services.language.engine.sampler import Sample, SampleInput, make_generator, sample_rows
from services.language.engine.scheduler import ScheduledChunk
from services.language.inputs import scatter_images
from services.language.model import Qwen3MoeForCausalLM
from services.language.mrope import mrope_positions

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
    ) -> None:
        self.cfg, self.model, self.dtype = cfg, model, dtype
        self.device = torch.device(device)
        t = cfg.text
        per_block = KVStorage.bytes_per_block(
            t.num_hidden_layers, block_size, t.num_key_value_heads, t.head_dim, dtype
        )
        self.num_blocks = kv_cache_bytes // per_block
        if self.num_blocks < 2:
            raise ValueError(
                f"kv cache of {kv_cache_bytes} bytes holds {self.num_blocks} blocks of "
                f"{per_block} bytes; give it more room"
            )
        self.block_size = block_size
        self.storage = KVStorage(
            t.num_hidden_layers, self.num_blocks, block_size, t.num_key_value_heads, t.head_dim,
            dtype, self.device,
        )  # fmt: skip
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB)", self.num_blocks, block_size,
                 self.num_blocks * per_block / 2**20)  # fmt: skip

    @torch.inference_mode()
    def prepare(self, req: Request, images: list[torch.Tensor], grids: list[tuple]) -> None:
        """Build `req.payload` from its prompt ids and its images' wire tensors (prompt order)."""
        merge = self.cfg.vision.spatial_merge_size if self.cfg.vision else 2
        image_token = self.cfg.image_token_id if self.cfg.image_token_id is not None else -1
        positions, delta = mrope_positions(req.prompt_ids, image_token, grids, merge)
        ids = torch.tensor(req.prompt_ids, device=self.device)
        embeds, deepstack = scatter_images(
            self.model.embed(ids), ids, image_token, images, self.cfg.num_deepstack
        )
        req.payload = PromptInputs(
            embeds, deepstack, positions.to(self.device), delta,
            make_generator(req.params.seed, self.device),
        )  # fmt: skip

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> dict[str, Sample]:
        """One forward over the chunks; returns a Sample for each chunk that ends its request's
        known tokens."""
        embeds: list[torch.Tensor] = []
        deepstack_rows: list[torch.Tensor] = []
        positions: list[torch.Tensor] = []
        seqs: list[tuple[int, int, torch.Tensor]] = []
        any_deepstack = any(c.req.payload.deepstack is not None for c in chunks)
        q_start = 0
        for c in chunks:
            e, d, p = self._chunk_inputs(c.req, c.start, c.length, any_deepstack)
            embeds.append(e)
            if d is not None:
                deepstack_rows.append(d)
            positions.append(p)
            slots = self.storage.slots(c.req.block_table, c.start + c.length, self.device)
            seqs.append((q_start, c.length, slots))
            q_start += c.length
        x = torch.cat(embeds)
        deepstack = torch.cat(deepstack_rows) if any_deepstack else None
        hidden = self.model(x, torch.cat(positions, dim=1), ForwardBatch(self.storage, seqs),
                            deepstack)  # fmt: skip
        sampling = [(i, c) for i, c in enumerate(chunks) if c.samples]
        if not sampling:
            return {}
        last_rows = torch.tensor([seqs[i][0] + seqs[i][1] - 1 for i, _ in sampling])
        logits = self.model.compute_logits(hidden[last_rows.to(self.device)])
        rows = [self._sample_input(c.req) for _, c in sampling]
        samples = sample_rows(logits, rows)
        return {c.req.id: s for (_, c), s in zip(sampling, samples, strict=True)}

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
        return SampleInput(req.params, req.payload.generator, req.prompt_ids, req.output_ids, stop)
