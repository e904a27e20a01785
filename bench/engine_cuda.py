"""`epd bench-engine --device cuda`: the engine's decode tokens/s on a GPU against the HBM limit.

A random-weight decoder at a preset's shapes (default `a3b-4layer`: Qwen3-VL-30B-A3B's decoder
layers, 4 of its 48, and its 151,936-token vocabulary) is built in GPU memory in bf16; `--model`
loads a checkpoint instead. Text only. For each batch size B, B requests of `--prompt-len` random
tokens are submitted at once and each decodes `--decode-tokens` tokens (end-of-sequence ignored)
through the engine (scheduler, runner, sampler, asyncio loop: what a client sees). The step time
is the median gap between consecutive tokens of a request over the middle half of every request
(prefill and the ragged end left out), and decode tokens/s is B over it. Every batch size runs
with CUDA graphs and, unless `--no-eager`, without them.

The bandwidth floor of a step: it must read at least once every weight it uses (per layer the
attention projections and norms, the router, and the experts the batch activates; then the final
norm and lm_head; and B embedding rows) plus the K/V of every cached token. Under uniform routing,
which random router weights approximate, B tokens activate E(1 - (1 - K/E)^B) distinct experts
per layer in expectation. Those bytes over the step time, against the device's HBM peak
(`bench.kernels.peaks`), is the fraction reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from bench.kernels import peaks
from common.config import ModelConfig, TextConfig
from common.contract import SamplingParams
from services.language.engine.engine import Engine
from services.language.engine.model_runner import ModelRunner
from services.language.engine.scheduler import SchedulerConfig
from services.language.model import Qwen3MoeForCausalLM
from services.tiny_model import PRESETS, preset_text_config


@dataclass
class DecodeRow:
    batch: int
    cuda_graphs: bool
    step_ms: float
    decode_tok_s: float
    experts_hit: float  # per MoE layer, expected under uniform routing
    mb_per_step: float  # the fewest bytes a step must read (see the module docstring)
    hbm_gb_s: float
    hbm_frac: float


def expected_experts_hit(num_experts: int, top_k: int, batch: int) -> float:
    """Distinct experts that `batch` tokens route to, each to `top_k` distinct experts drawn
    uniformly: E * (1 - (1 - K/E)^B)."""
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def decode_bytes(t: TextConfig, batch: int, context: float, elem: int) -> float:
    """The fewest bytes one decode step of `batch` sequences, each with `context` cached tokens,
    reads from device memory (weights and K/V in `elem`-byte elements)."""
    h, hd, hkv = t.hidden_size, t.head_dim, t.num_key_value_heads
    attention = 2 * h * t.num_attention_heads * hd + 2 * h * hkv * hd  # q, o; k, v
    norms = 2 * h + 2 * hd  # input and post-attention norms; q and k norms
    kv = batch * context * 2 * hkv * hd
    weights = 0.0
    for layer in range(t.num_hidden_layers):
        weights += attention + norms
        if t.is_moe_layer(layer):
            hit = expected_experts_hit(t.num_experts, t.num_experts_per_tok, batch)
            weights += t.num_experts * h + hit * 3 * h * t.moe_intermediate_size
        else:
            weights += 3 * h * t.intermediate_size
    head = h + t.vocab_size * h  # final norm, lm_head
    embed = batch * h
    return (weights + t.num_hidden_layers * kv + head + embed) * elem


def random_decoder(
    t: TextConfig, dtype: torch.dtype, device: torch.device | str, seed: int = 0
) -> Qwen3MoeForCausalLM:
    """The decoder with N(0, 0.02) weights and unit norms, allocated straight in `dtype` on
    `device` (no float32 copy on the host)."""
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(t).to(dtype)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # RMSNorm weights
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the CUDA run (`bench.engine` adds them to `epd bench-engine`)."""
    g = parser.add_argument_group("--device cuda")
    g.add_argument(
        "--preset", choices=sorted(PRESETS), default="a3b-4layer", help="random decoder shapes"
    )
    g.add_argument("--batches", default="1,8,64", help="comma-separated decode batch sizes")
    g.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt")
    g.add_argument("--decode-tokens", type=int, default=64, help="tokens decoded per request")
    g.add_argument("--no-eager", action="store_true", help="CUDA graphs only, no eager baseline")
    g.add_argument("--peak-gb-s", type=float, help="HBM peak in GB/s (default: datasheet)")


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("epd bench-engine --device cuda needs a CUDA GPU (torch sees none)")
        return 2
    dtype = getattr(torch, args.dtype or "bfloat16")
    batches = [int(b) for b in args.batches.split(",")]
    cfg, model = _load(args, dtype)
    device_name = torch.cuda.get_device_name()
    peak_bw, _ = peaks(device_name, args.peak_gb_s, None)
    rows: list[DecodeRow] = []
    for graphs in (True,) if args.no_eager else (True, False):
        runner = ModelRunner(
            cfg, model, args.kv_cache_bytes, 16, dtype, "cuda",
            cuda_graphs=graphs, max_batch=max(batches),
        )  # fmt: skip
        for b in batches:
            asyncio.run(_decode(runner, cfg, b, args.prompt_len, 4, args.seed))  # warm-up
            stamps = asyncio.run(
                _decode(runner, cfg, b, args.prompt_len, args.decode_tokens, args.seed)
            )
            rows.append(_row(cfg.text, runner, b, stamps, args, dtype, peak_bw))
        del runner
        torch.cuda.empty_cache()
    if args.json:
        out = {"device": device_name, "peak_hbm_b_s": peak_bw, "dtype": str(dtype)}
        print(json.dumps({**out, "rows": [asdict(r) for r in rows]}, indent=2))
    else:
        print(format_table(rows, device_name))
    return 0


def _load(args: argparse.Namespace, dtype: torch.dtype) -> tuple[ModelConfig, Qwen3MoeForCausalLM]:
    if args.model:
        from services.language.weights import load_decoder

        cfg = ModelConfig.from_dir(args.model)
        return cfg, load_decoder(args.model, cfg, dtype, "cuda")
    text = preset_text_config(args.preset)
    # Decoder only: no vision tower, so no image token and no deepstack.
    cfg = ModelConfig("qwen3_vl_moe", text, None, tie_word_embeddings=False)
    return cfg, random_decoder(text, dtype, "cuda", args.seed)


async def _decode(
    runner: ModelRunner, cfg: ModelConfig, batch: int, prompt_len: int, tokens: int, seed: int
) -> list[list[float]]:
    """`batch` requests at once; each request's token timestamps (perf_counter seconds)."""
    sched = SchedulerConfig(max_num_seqs=batch, max_batch_tokens=batch * prompt_len)
    engine = Engine(cfg, runner, sched)
    rng = random.Random(seed)
    low = 20  # past the special tokens
    prompts = [[rng.randrange(low, cfg.text.vocab_size) for _ in range(prompt_len)]
               for _ in range(batch)]  # fmt: skip
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)

    async def one(ids: list[int]) -> list[float]:
        stamps = []
        async for _ in engine.generate(ids, params):
            stamps.append(time.perf_counter())
        return stamps

    await engine.start()
    try:
        return list(await asyncio.gather(*(one(p) for p in prompts)))
    finally:
        await engine.stop()


def step_seconds(stamps: list[list[float]]) -> float:
    """Median gap between consecutive tokens over the middle half of every request."""
    gaps = []
    for s in stamps:
        lo, hi = len(s) // 4, max(len(s) // 4 + 2, 3 * len(s) // 4)
        gaps += [b - a for a, b in zip(s[lo : hi - 1], s[lo + 1 : hi], strict=True)]
    return statistics.median(gaps)


def _row(
    t: TextConfig,
    runner: ModelRunner,
    batch: int,
    stamps: list[list[float]],
    args: argparse.Namespace,
    dtype: torch.dtype,
    peak_bw: float,
) -> DecodeRow:
    step = step_seconds(stamps)
    context = args.prompt_len + args.decode_tokens / 2  # cached tokens, mid-window
    nbytes = decode_bytes(t, batch, context, torch.empty((), dtype=dtype).element_size())
    return DecodeRow(
        batch=batch,
        cuda_graphs=runner.graphs is not None,
        step_ms=step * 1e3,
        decode_tok_s=batch / step,
        experts_hit=expected_experts_hit(t.num_experts, t.num_experts_per_tok, batch),
        mb_per_step=nbytes / 1e6,
        hbm_gb_s=nbytes / step / 1e9,
        hbm_frac=nbytes / step / peak_bw,
    )


def format_table(rows: list[DecodeRow], device: str) -> str:
    head = (f"{'batch':>5} {'graphs':>6} {'step ms':>8} {'tok/s':>9} {'experts':>7} "
            f"{'MB/step':>8} {'GB/s':>7} {'%HBM':>5}")  # fmt: skip
    lines = [f"engine decode on {device}", head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.batch:>5} {'yes' if r.cuda_graphs else 'no':>6} {r.step_ms:8.3f} "
            f"{r.decode_tok_s:9.1f} {r.experts_hit:7.1f} {r.mb_per_step:8.1f} "
            f"{r.hbm_gb_s:7.0f} {100 * r.hbm_frac:5.1f}"
        )
    return "\n".join(lines)
