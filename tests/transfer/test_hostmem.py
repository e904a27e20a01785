"""The producer pool's host memory: aligned, zeroed, on huge pages where THP allows it."""

from __future__ import annotations

import gc
import re
from pathlib import Path

import pytest

from common.transfer import Producer, TransferConfig
from common.transfer.hostmem import HUGE_PAGE, host_buffer


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping of this process that contains `address`, in KiB."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if m := re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line):
            inside = int(m[1], 16) <= address < int(m[2], 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def _thp_mode() -> str:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    found = re.search(r"\[(\w+)\]", path.read_text()) if path.exists() else None
    return found[1] if found else "never"


def test_host_buffer_is_aligned_zeroed_and_writable() -> None:
    buf = host_buffer(3 * HUGE_PAGE + 123)
    assert buf.numel() == 3 * HUGE_PAGE + 123 and buf.data_ptr() % HUGE_PAGE == 0
    assert int(buf.count_nonzero()) == 0
    buf[-1] = 7
    assert int(buf[-1]) == 7


@pytest.mark.skipif(_thp_mode() == "never", reason="this kernel has transparent huge pages off")
def test_pool_memory_sits_on_huge_pages() -> None:
    with Producer(TransferConfig(backend="nixl", pool_bytes=16 * HUGE_PAGE)) as producer:
        memory = producer.pool.memory
        assert memory.data_ptr() % HUGE_PAGE == 0
        assert _anon_huge_kib(memory.data_ptr()) >= 8 * HUGE_PAGE // 1024


def _rss_mib() -> float:
    text = Path("/proc/self/smaps_rollup").read_text()
    return int(re.search(r"^Rss:\s+(\d+) kB", text, re.M)[1]) / 1024  # type: ignore[index]


def test_host_buffer_memory_is_returned_when_freed() -> None:
    before = _rss_mib()
    buf = host_buffer(64 << 20)
    assert _rss_mib() - before > 60  # prefaulted
    del buf
    gc.collect()
    assert _rss_mib() - before < 8


def test_host_buffer_refuses_empty() -> None:
    with pytest.raises(ValueError, match="positive"):
        host_buffer(0)
