"""The `epd` command line: one subcommand per role or tool.

Each subcommand lives in its own module, imported only when it runs (so `epd --help` stays fast
and a role never imports another role's dependencies). A subcommand module exposes
`add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help). Keep sorted by role, then tools, then benchmarks.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "encoder": ("services.encoder.__main__", "serve the vision encoder (gRPC Encoder)"),
    "language": ("services.language.__main__", "serve the language model (gRPC Language)"),
    "gateway": (
        "services.gateway.__main__",
        "serve the OpenAI-compatible HTTP and gRPC front door",
    ),
    "up": ("services.up", "start encoders, a language service and the gateway on loopback"),
    "demo": ("services.demo", "start the stack, ask one question about an image, stop"),
    "health": ("services.health_cli", "exit 0 if a role's gRPC health service is SERVING"),
    "generate": ("services.generate_cli", "run the whole model in this process (no services)"),
    "make-tiny-model": ("services.tiny_model", "write a random-weight checkpoint for tests/demos"),
    "bench-generate": (
        "bench.generate",
        "prefill/decode tokens/s of `epd generate` vs transformers",
    ),
    "bench": (
        "bench.load",
        "load-test the gateway, side by side with other OpenAI-compatible servers (--against)",
    ),
    "bench-engine": (
        "bench.engine",
        "language engine vs transformers (CPU); decode tok/s vs HBM peak (--device cuda)",
    ),
    "bench-step": (
        "bench.step_profile",
        "one engine step at several batch sizes, timed by component (CPU)",
    ),
    "bench-structured": (
        "bench.structured",
        "what structured decoding (xgrammar bitmasks) costs a batch-32 decode step",
    ),
    "bench-cpu-kernels": (
        "bench.cpu_kernels",
        "CPU prototypes vs the engine's kernels: MoE experts, decode attention, threads",
    ),
    "bench-encoder": (
        "bench.encoder",
        "encoder images/s (or video frames/s and tokens/s) with dynamic batching vs without",
    ),
    "bench-transfer": ("bench.transfer", "GB/s of each tensor transfer backend vs memcpy"),
    "bench-kernels": ("bench.kernels", "MoE layer time, Triton vs torch, vs HBM/bf16 peaks (GPU)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epd",
        description="Encoder/language disaggregated serving for Qwen3-VL-MoE.",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in SUBCOMMANDS.items():
        # Module import is deferred to parse time of this one subcommand (see main).
        sub.add_parser(name, help=help_text, description=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # First pass: find the subcommand without importing every module.
    known, _ = parser.parse_known_args(argv)
    module_name, help_text = SUBCOMMANDS[known.command]
    module = importlib.import_module(module_name)
    full = argparse.ArgumentParser(prog=f"epd {known.command}", description=help_text)
    module.add_arguments(full)
    # Everything after the subcommand name belongs to it; global flags come before it.
    idx = argv.index(known.command)
    args = full.parse_args(argv[idx + 1 :])
    logging.basicConfig(
        level=known.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
