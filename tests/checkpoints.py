"""Checkpoint variants the tests derive from the tiny ones."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file


def per_expert_copy(src: Path, dst: Path) -> Path:
    """`src` with its fused experts stored as plain Qwen3-MoE hub checkpoints store them: one
    gate/up/down tensor per expert."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    for key in [k for k in tensors if k.endswith("experts.gate_up_proj")]:
        base = key[: -len("gate_up_proj")]
        gate_up, down = tensors.pop(key), tensors.pop(base + "down_proj")
        i = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            tensors[f"{base}{e}.gate_proj.weight"] = gate_up[e, :i].contiguous()
            tensors[f"{base}{e}.up_proj.weight"] = gate_up[e, i:].contiguous()
            tensors[f"{base}{e}.down_proj.weight"] = down[e].contiguous()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst
