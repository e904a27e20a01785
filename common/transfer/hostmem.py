"""Host memory for a producer pool: anonymous, on transparent huge pages where the kernel allows
it, and prefaulted.

Huge pages matter for the one-sided paths: a NIXL READ on one host is a `process_vm_readv` that
pins the pool's pages one by one, and RDMA registration walks them too. With 2 MiB pages a 16 MiB
NIXL read went from about 3.6 to 5 GB/s here (bench-transfer). Under THP `madvise` mode (the
usual default) only regions that ask get them, which is why the pool asks.

Start-up cost: prefaulting is a memset of the pool. On a VM that hands freed memory back to its
host (free page reporting, as on the Firecracker VM where this was measured), huge pages are
often ones the host must back again, and a 1 GiB pool took 2-4 s to fault instead of 0.4 s;
on bare metal, or once the memory is backed, it is about 0.1-0.2 s.
"""

from __future__ import annotations

import contextlib
import mmap

import numpy as np
import torch

HUGE_PAGE = 2 << 20


def host_buffer(nbytes: int) -> torch.Tensor:
    """A flat uint8 CPU tensor of `nbytes` zeros, 2 MiB aligned, huge-page backed if possible.

    The tensor keeps its mapping alive; the memory returns to the system when it is freed.
    """
    if nbytes <= 0:
        raise ValueError(f"nbytes must be positive, got {nbytes}")
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # Kernels without THP (or with it set to `never`) refuse or ignore this: small pages then.
    with contextlib.suppress(OSError, AttributeError):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)  # holds a reference to `mapping`
    start = -whole.data_ptr() % HUGE_PAGE
    buffer = whole[start : start + nbytes]
    # Touch every page now, so publishing never faults. numpy, not torch: a torch fill here
    # would start an OpenMP team on this thread (see common/torch_thread.py).
    np.asarray(buffer.numpy()).fill(0)
    return buffer
