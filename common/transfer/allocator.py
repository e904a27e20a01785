"""First-fit allocator over byte offsets of one fixed region (pure Python, no torch).

Invariants: free ranges are sorted by offset, disjoint, non-empty and never adjacent (frees
coalesce), and every offset and size handed out is a multiple of `align`.
"""

from __future__ import annotations

import bisect


class Allocator:
    def __init__(self, capacity: int, align: int = 4096) -> None:
        if align <= 0 or align & (align - 1):
            raise ValueError(f"align must be a power of two, got {align}")
        self.align = align
        self.capacity = capacity - capacity % align
        self._free: list[tuple[int, int]] = [(0, self.capacity)] if self.capacity else []
        self._used: dict[int, int] = {}  # offset -> size
        self.bytes_in_use = 0

    def round_up(self, nbytes: int) -> int:
        return max(self.align, -(-nbytes // self.align) * self.align)

    def allocate(self, nbytes: int) -> int | None:
        """Offset of a new block of at least `nbytes`, or None when no free range is big enough."""
        size = self.round_up(nbytes)
        for i, (start, length) in enumerate(self._free):
            if length >= size:
                if length == size:
                    del self._free[i]
                else:
                    self._free[i] = (start + size, length - size)
                self._used[start] = size
                self.bytes_in_use += size
                return start
        return None

    def free(self, offset: int) -> None:
        size = self._used.pop(offset)
        self.bytes_in_use -= size
        i = bisect.bisect_left(self._free, (offset, 0))
        # Coalesce with the following and the preceding free range.
        if i < len(self._free) and self._free[i][0] == offset + size:
            size += self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            start, length = self._free[i - 1]
            self._free[i - 1] = (start, length + size)
        else:
            self._free.insert(i, (offset, size))

    def largest_free(self) -> int:
        return max((length for _, length in self._free), default=0)
