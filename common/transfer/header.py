"""The 64-byte header after each tensor in a producer pool: who owns the slot, and whether the
consumer has acknowledged it.

Slot layout in the pool: `[data: nbytes][pad to 64][header: 64]`, the data first so that it starts
at the slot's (page-aligned) offset. Header: bytes 0..15 the tensor id (16 raw bytes), 16..23 the
state (little-endian u64), the rest zero.

One-sided readers (shm, NIXL) re-read the header *after* copying the data: the producer zeroes it
before a slot can be reused and ids are never reused, so "header still names my id" proves the
data was not overwritten during the copy (a seqlock). They acknowledge by writing the id with state
ACKED; the producer's reaper frees slots whose header says so.
"""

from __future__ import annotations

import struct

HEADER_BYTES = 64
# Bytes of the header that carry meaning (id + state); readers and writers touch only these.
HEADER_USED = 24
STATE_LIVE = 1
STATE_ACKED = 2

_FMT = struct.Struct("<16sQ")


def header_offset(data_offset: int, nbytes: int) -> int:
    return data_offset + -(-nbytes // HEADER_BYTES) * HEADER_BYTES


def slot_bytes(nbytes: int) -> int:
    return header_offset(0, nbytes) + HEADER_BYTES


def encode(tensor_id: str, state: int) -> bytes:
    return _FMT.pack(bytes.fromhex(tensor_id), state)


def decode(raw: bytes) -> tuple[str, int]:
    """(id as hex, state) of the first HEADER_USED bytes; a zeroed header gives ("000...", 0)."""
    raw_id, state = _FMT.unpack(raw[:HEADER_USED])
    return raw_id.hex(), state
