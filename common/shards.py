"""Reading one rank's part of a checkpoint tensor straight from the safetensors mmap.

A tensor-parallel rank holds a slice of most weights: some rows of q/k/v, some columns of o_proj,
part of every expert's intermediate dimension, or some of the experts. A `Shard` names that part
in the module's layout (the shape our parameter has, e.g. `gate_up_proj [E, 2I, H]`); the reader
maps it onto however the checkpoint stores the tensor (the module's layout, the hub's transposed
fused experts `[E, H, 2I]`, or one tensor per expert) and reads only those elements: safetensors'
`get_slice` copies the slice out of the mmap, so a rank's resident memory is its part alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, slots=True)
class Shard:
    """Along `dim` (of the module's layout, full size `full`), the concatenation of the index
    ranges `[start, stop)` in `ranges`, in order. E.g. one rank's half of a fused gate/up
    `[E, 2I, H]`: dim 1, ranges ((0, I/2), (I, I + I/2)) (its gate rows, then its up rows)."""

    dim: int
    ranges: tuple[tuple[int, int], ...]
    full: int

    @property
    def size(self) -> int:
        return sum(b - a for a, b in self.ranges)

    def full_shape(self, local: tuple[int, ...]) -> tuple[int, ...]:
        """The whole tensor's shape, given this part's."""
        return (*local[: self.dim], self.full, *local[self.dim + 1 :])

    def pieces(self, sizes: tuple[int, ...]) -> list[tuple[int, int, int]]:
        """The ranges mapped onto a dimension stored as consecutive pieces of `sizes` (a
        per-expert checkpoint's gate then up): `(piece, start, stop)` in the piece's own
        indices, in the shard's order."""
        out = []
        for a, b in self.ranges:
            base = 0
            for piece, n in enumerate(sizes):
                lo, hi = max(a, base), min(b, base + n)
                if lo < hi:
                    out.append((piece, lo - base, hi - base))
                base += n
        return out


def read_slices(handle: Any, key: str, dim: int, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """`key`'s elements at `ranges` along `dim`, concatenated: only those are read."""
    view = handle.get_slice(key)
    rank = len(view.get_shape())
    parts = []
    for a, b in ranges:
        index = tuple(slice(a, b) if d == dim else slice(None) for d in range(rank))
        parts.append(view[index])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
