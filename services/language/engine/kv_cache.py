"""KV block accounting with prefix caching (pure Python; the tensors live in the model runner).

The cache is `num_blocks` blocks of `block_size` token slots. A request's `block_table` lists its
blocks in order; token i lives in slot `block_table[i // block_size] * block_size + i % block_size`.

Prefix caching: once every slot of a block holds computed K/V, the block is registered under a
128-bit digest chained from its predecessor's: BLAKE2b, keyed with a random per-process key, over
(parent digest, the block's token ids, and for every image run in the block its place in the
block, its first row in the image and the image's identity). An image's identity is a digest of
the tensor bytes and grid the service itself received (never a field a client sets), so the same
image shares blocks and different images never do; a lookup compares digests only, and a keyed
128-bit digest can neither collide by chance nor be steered by a client. A block with no owner
stays in the cache (and findable) until it is reused for something else, least recently freed
first.

Invariants (checked by `check`): every block is either free (ref 0) or referenced by exactly
`ref` block-table entries of live requests; the free list holds each ref-0 block once.
"""

from __future__ import annotations

import hashlib
import os
import struct
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from services.language.engine.request import Request

_KEY = os.urandom(32)  # keys the block digests: unpredictable outside this process
_RUN = struct.Struct("<III")  # an image run in a block: offset in block, first image row, length


@dataclass(slots=True)
class Block:
    id: int
    ref: int = 0
    hash: bytes | None = None  # 16-byte chained digest once registered


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, image_token_id: int | None) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.block_size = block_size
        self.image_token_id = image_token_id
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in reuse order: oldest freed first. Cached blocks stay findable here.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}  # digest -> block id
        self.hit_tokens_total = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return len(self.blocks) - len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- admission and growth ----

    def match_prefix(self, req: Request) -> list[int]:
        """Block ids of the longest cached prefix of `req`'s tokens (never its last token)."""
        ids = req.all_ids
        hits: list[int] = []
        parent = b""
        for b in range((req.num_tokens - 1) // self.block_size):
            h = self._digest(req, ids, b, parent)
            bid = self.cached.get(h)
            if bid is None:
                break
            hits.append(bid)
            parent = h
        return hits

    def admit(self, req: Request, hits: Sequence[int]) -> None:
        """Give `req` the prefix-cache hits; the scheduler grows it with `ensure` afterwards."""
        for bid in hits:
            self._take(bid)
        req.block_table = list(hits)
        req.num_registered_blocks = len(hits)
        req.num_computed = len(hits) * self.block_size
        self.hit_tokens_total += req.num_computed

    def can_ensure(self, req: Request, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(req.block_table) <= self.num_free

    def ensure(self, req: Request, num_tokens: int) -> None:
        """Grow `req`'s block table to hold `num_tokens` tokens (caller checked `can_ensure`)."""
        need = self.blocks_for(num_tokens) - len(req.block_table)
        if need > self.num_free:
            raise RuntimeError("ensure() without can_ensure(): out of KV blocks")
        for _ in range(need):
            bid = next(iter(self.free))
            self._forget(bid)
            self._take(bid)
            req.block_table.append(bid)

    def commit(self, req: Request) -> None:
        """Register the blocks that `req.num_computed` has just filled completely.

        Starts after the blocks registered before, so a step costs O(new blocks), not
        O(sequence length)."""
        full = req.num_computed // self.block_size
        start = req.num_registered_blocks
        ids: list[int] | None = None
        parent = self.blocks[req.block_table[start - 1]].hash or b"" if start else b""
        for b in range(start, full):
            block = self.blocks[req.block_table[b]]
            if block.hash is not None:  # registered earlier (by this request or a shared hit)
                parent = block.hash
                continue
            ids = req.all_ids if ids is None else ids
            h = self._digest(req, ids, b, parent)
            # Another request may have registered the same content first; keep that one.
            self.cached.setdefault(h, block.id)
            block.hash = h
            parent = h
        req.num_registered_blocks = max(start, full)

    def release(self, req: Request) -> None:
        """Drop `req`'s references (finish, abort or preemption). Its blocks stay cached."""
        for bid in reversed(req.block_table):  # tail first: reused before the shared prefix
            block = self.blocks[bid]
            block.ref -= 1
            if block.ref == 0:
                self.free[bid] = None
        req.block_table = []
        req.num_registered_blocks = 0
        req.num_computed = 0

    # ---- internals ----

    def _take(self, bid: int) -> None:
        block = self.blocks[bid]
        if block.ref == 0:
            del self.free[bid]
        block.ref += 1

    def _forget(self, bid: int) -> None:
        block = self.blocks[bid]
        if block.hash is not None and self.cached.get(block.hash) == bid:
            del self.cached[block.hash]
        block.hash = None

    def _digest(self, req: Request, ids: list[int], b: int, parent: bytes) -> bytes:
        """The chained digest of block b of `req` (see the module docstring)."""
        lo, hi = b * self.block_size, (b + 1) * self.block_size
        d = hashlib.blake2b(parent, digest_size=16, key=_KEY)
        d.update(array("i", ids[lo:hi]).tobytes())
        for span in req.images:
            first, last = max(lo, span.start), min(hi, span.start + span.length)
            if first < last:
                d.update(_RUN.pack(first - lo, first - span.start, last - first))
                d.update(span.identity)
        return d.digest()

    def check(self, live: Sequence[Request]) -> None:
        """Assert the accounting invariants (tests call this after every operation)."""
        refs = [0] * len(self.blocks)
        for req in live:
            for bid in req.block_table:
                refs[bid] += 1
            registered = req.block_table[: req.num_registered_blocks]
            if len(registered) != req.num_registered_blocks or any(
                self.blocks[bid].hash is None for bid in registered
            ):
                raise AssertionError(f"{req.id}: registered-block count out of step")
            if req.num_registered_blocks < req.num_computed // self.block_size:
                raise AssertionError(f"{req.id}: a computed full block is not registered")
        for block in self.blocks:
            if block.ref != refs[block.id]:
                raise AssertionError(
                    f"block {block.id}: ref {block.ref} != owners {refs[block.id]}"
                )
            if (block.ref == 0) != (block.id in self.free):
                raise AssertionError(
                    f"block {block.id}: ref {block.ref} but free={block.id in self.free}"
                )
        for h, bid in self.cached.items():
            if self.blocks[bid].hash != h:
                raise AssertionError(f"cached hash of block {bid} is stale")
