"""Safetensors checkpoints: find the files, map checkpoint keys onto a module, load without copies.

A model directory holds either `model.safetensors` or shards listed in
`model.safetensors.index.json`. Tensors are read through safetensors' mmap; when the checkpoint
dtype equals the target dtype on CPU, the module's parameters *are* the mmapped tensors
(`load_state_dict(assign=True)`), which is also what transformers does (and matters for bit-exact
fp32 parity, see FACTS.md).

Fused MoE experts come in two layouts, decided by shape against the module's parameter:
transformers 5.x saves `gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]`; hub checkpoints of the
4.57 era store `[E, H, 2I]` / `[E, I, H]`. Plain Qwen3-MoE hub checkpoints store one tensor per
expert (`experts.{e}.gate_proj.weight` ...), which are stacked into the fused layout.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from common.shards import Shard, read_slices

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Show a progress bar only when loading takes long enough to wonder about.
PROGRESS_MIN_BYTES = 512 << 20

_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class Checkpoint:
    """Read-only view of the safetensors files of one model directory."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.model_dir / SINGLE_FILE).is_file():
            with safe_open(self.model_dir / SINGLE_FILE, framework="pt") as f:
                weight_map = {k: SINGLE_FILE for k in f.keys()}  # noqa: SIM118 (not a dict)
        else:
            raise ValueError(
                f"{self.model_dir}: no {SINGLE_FILE} or {INDEX_FILE} (missing weights?)"
            )
        missing = sorted({f for f in weight_map.values() if not (self.model_dir / f).is_file()})
        if missing:
            raise ValueError(
                f"{self.model_dir}: weight files listed in the index are missing: {missing}"
            )
        self.weight_map = weight_map
        self._handles: dict[str, object] = {}

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def _file(self, key: str):  # type: ignore[no-untyped-def]
        name = self.weight_map[key]
        if name not in self._handles:
            self._handles[name] = safe_open(self.model_dir / name, framework="pt")
        return self._handles[name]

    def get(self, key: str) -> torch.Tensor:
        return self._file(key).get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file(key).get_slice(key).get_shape())

    def nbytes(self, keys: Iterable[str]) -> int:
        total = 0
        for k in keys:
            sl = self._file(k).get_slice(k)
            n = 1
            for s in sl.get_shape():
                n *= s
            total += n * _DTYPE_BYTES.get(sl.get_dtype(), 4)
        return total


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "F64": 8, "U8": 1, "I8": 1}


def load_module(
    module: nn.Module,
    ckpt: Checkpoint,
    rename: Callable[[str], str | None],
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    tied: dict[str, str] | None = None,
    shard: Callable[[str], Shard | None] | None = None,
) -> None:
    """Load `module`'s parameters and persistent buffers from `ckpt`.

    `rename(checkpoint_key)` returns the module key, or None for keys that belong to another part
    of the model (e.g. the vision tower when loading the decoder). `tied` maps a module key that
    may be absent from the checkpoint to the module key it shares storage with. `shard(module_key)`
    names the part of a tensor this module holds (a tensor-parallel rank's; the module's parameter
    then has the part's shape), None for the whole tensor; only that part is read.
    Raises ValueError listing every missing and unexpected key.
    """
    expected = module.state_dict()
    sources: dict[str, list[str]] = {}
    unexpected: list[str] = []
    for ck in ckpt.weight_map:
        m = _PER_EXPERT.match(ck)
        target = rename(m.group(1) + "." + _fused_name(m.group(3)) if m else ck)
        if target is None:
            continue
        if target not in expected:
            unexpected.append(ck)
            continue
        sources.setdefault(target, []).append(ck)
    tied = tied or {}
    missing = [k for k in expected if k not in sources and k not in tied]
    if missing or unexpected:
        raise ValueError(_key_error(ckpt.model_dir, missing, unexpected))

    total = ckpt.nbytes(k for ks in sources.values() for k in ks)
    state: dict[str, torch.Tensor] = {}
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc=f"loading {ckpt.model_dir.name}",
        disable=True if total < PROGRESS_MIN_BYTES else None,
    ) as bar:
        for target, keys in sources.items():
            part = shard(target) if shard is not None else None
            want = expected[target].shape
            if part is None:
                tensor = _assemble(ckpt, keys, want, target)
            else:
                tensor = _assemble_part(ckpt, keys, tuple(want), target, part)
            state[target] = _place(tensor, dtype, device)
            bar.update(ckpt.nbytes(keys))
    for key, source in tied.items():
        if key not in state:
            state[key] = state[source]
    module.load_state_dict(state, strict=True, assign=True)
    module.requires_grad_(False)  # inference only
    held = sum(t.numel() * t.element_size() for t in state.values())
    log.info("loaded %d tensors (%.1f MiB of the checkpoint's %.1f MiB) from %s", len(state),
             held / 2**20, total / 2**20, ckpt.model_dir)  # fmt: skip


def _fused_name(proj: str) -> str:
    return "down_proj" if proj == "down_proj" else "gate_up_proj"


def _assemble(ckpt: Checkpoint, keys: list[str], want: torch.Size, target: str) -> torch.Tensor:
    """The tensor for one module key, converting expert layouts to the module's."""
    if len(keys) > 1 or _PER_EXPERT.match(keys[0]):
        return _stack_experts(ckpt, keys, want, target)
    tensor = ckpt.get(keys[0])
    if tensor.shape == want:
        return tensor
    # Hub (transformers 4.57) fused experts: the last two dims are swapped.
    fused = target.endswith(("experts.gate_up_proj", "experts.down_proj"))
    if fused and tensor.ndim == 3 and tensor.transpose(1, 2).shape == want:
        return tensor.transpose(1, 2).contiguous()
    raise ValueError(
        f"{ckpt.model_dir}: tensor {keys[0]} has shape {tuple(tensor.shape)}, "
        f"expected {tuple(want)} for {target}"
    )


def _assemble_part(
    ckpt: Checkpoint, keys: list[str], want: tuple[int, ...], target: str, part: Shard
) -> torch.Tensor:
    """`part` of the tensor for one module key, read alone from the checkpoint's layout."""
    full = part.full_shape(want)
    if len(keys) > 1 or _PER_EXPERT.match(keys[0]):
        return _stack_expert_part(ckpt, keys, full, target, part)
    key = keys[0]
    stored = ckpt.shape(key)
    ranges = list(part.ranges)
    if stored == full:
        return read_slices(ckpt._file(key), key, part.dim, ranges)
    fused = target.endswith(("experts.gate_up_proj", "experts.down_proj"))
    if fused and len(stored) == 3 and (stored[0], stored[2], stored[1]) == full:
        dim = (0, 2, 1)[part.dim]  # hub layout: the last two dims swapped
        return read_slices(ckpt._file(key), key, dim, ranges).transpose(1, 2).contiguous()
    raise ValueError(
        f"{ckpt.model_dir}: tensor {key} has shape {stored}, expected {full} for {target}"
    )


def _stack_expert_part(
    ckpt: Checkpoint, keys: list[str], full: tuple[int, ...], target: str, part: Shard
) -> torch.Tensor:
    """`part` of fused experts from one tensor per expert: only the experts in the part (dim 0)
    or each expert's slice (dims 1-2) is read."""
    by_expert: dict[int, dict[str, str]] = {}
    for k in keys:
        m = _PER_EXPERT.match(k)
        if m is None:
            raise ValueError(f"{ckpt.model_dir}: {k} mixes fused and per-expert layouts")
        by_expert.setdefault(int(m.group(2)), {})[m.group(3)] = k
    if sorted(by_expert) != list(range(full[0])):
        raise ValueError(
            f"{ckpt.model_dir}: {target} needs experts 0..{full[0] - 1}, found {sorted(by_expert)}"
        )
    gate_up = target.endswith("gate_up_proj")
    names = ("gate_proj", "up_proj") if gate_up else ("down_proj",)
    experts = [e for a, b in part.ranges for e in range(a, b)] if part.dim == 0 else range(full[0])
    parts = []
    for e in experts:
        if any(n not in by_expert[e] for n in names):
            raise ValueError(f"{ckpt.model_dir}: expert {e} of {target} lacks one of {names}")
        stored = [by_expert[e][n] for n in names]  # per expert: gate [I, H], up [I, H] / [H, I]
        if part.dim == 0:
            parts.append(torch.cat([ckpt.get(k) for k in stored]))
        elif part.dim == 1 and gate_up:  # rows of the virtual [gate; up]
            sizes = tuple(ckpt.shape(k)[0] for k in stored)
            pieces = [read_slices(ckpt._file(stored[p]), stored[p], 0, [(a, b)])
                      for p, a, b in part.pieces(sizes)]  # fmt: skip
            parts.append(torch.cat(pieces))
        else:
            dim = part.dim - 1
            parts.append(torch.cat([read_slices(ckpt._file(k), k, dim, list(part.ranges))
                                    for k in stored]))  # fmt: skip
    return torch.stack(parts)


def _stack_experts(
    ckpt: Checkpoint, keys: list[str], want: torch.Size, target: str
) -> torch.Tensor:
    """Per-expert `[I, H]` gate/up and `[H, I]` down weights -> fused `[E, 2I, H]` / `[E, H, I]`."""
    by_expert: dict[int, dict[str, torch.Tensor]] = {}
    for k in keys:
        m = _PER_EXPERT.match(k)
        if m is None:
            raise ValueError(f"{ckpt.model_dir}: {k} mixes fused and per-expert layouts")
        by_expert.setdefault(int(m.group(2)), {})[m.group(3)] = ckpt.get(k)
    if sorted(by_expert) != list(range(want[0])):
        raise ValueError(
            f"{ckpt.model_dir}: {target} needs experts 0..{want[0] - 1}, found {sorted(by_expert)}"
        )
    parts = []
    for e in range(want[0]):
        w = by_expert[e]
        if target.endswith("gate_up_proj"):
            if "gate_proj" not in w or "up_proj" not in w:
                raise ValueError(f"{ckpt.model_dir}: expert {e} of {target} lacks gate or up")
            parts.append(torch.cat([w["gate_proj"], w["up_proj"]], dim=0))
        else:
            parts.append(w["down_proj"])
    stacked = torch.stack(parts)
    if stacked.shape != want:
        raise ValueError(
            f"{ckpt.model_dir}: stacked experts for {target} have shape {tuple(stacked.shape)}, "
            f"expected {tuple(want)}"
        )
    return stacked


def _place(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    if not tensor.is_floating_point():
        return tensor.to(device)
    return tensor.to(device=device, dtype=dtype)


def _key_error(model_dir: Path, missing: list[str], unexpected: list[str]) -> str:
    def show(keys: list[str]) -> str:
        head = ", ".join(keys[:20])
        return head + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")

    parts = [f"{model_dir}: checkpoint does not match the model"]
    if missing:
        parts.append(f"missing keys ({len(missing)}): {show(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {show(unexpected)}")
    return "; ".join(parts)
