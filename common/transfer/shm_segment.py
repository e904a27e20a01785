"""POSIX shared-memory segments under /dev/shm, with owner liveness via flock.

The creating process holds an exclusive flock on its segment for as long as it lives; the kernel
drops the lock when the process dies, however it dies. So "can I take a shared lock?" tells a
consumer that the producer is gone (without pids, which mean nothing across pod pid namespaces),
and a producer starting up can unlink segments that a SIGKILLed predecessor left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import secrets
import time
from pathlib import Path

import torch

SHM_DIR = Path("/dev/shm")
# A segment still of size 0 this young may be one a live producer is creating right now
# (between its O_EXCL create and its flock); the sweeper leaves it alone.
_CREATING_GRACE_S = 5.0


class ShmSegment:
    """One mapped segment. `tensor` is a flat uint8 view of all of it."""

    def __init__(self, name: str, fd: int, size: int, owner: bool) -> None:
        self.name = name
        self.size = size
        self.owner = owner
        self._fd = fd
        # The owner prefaults its whole pool once (every slot gets written). A consumer maps
        # lazily: it reads only the slots it is handed, and populating a 1 GiB pool costs it
        # ~170 ms on the first fetch for nothing.
        flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if owner else 0)
        self._mmap: mmap.mmap | None = mmap.mmap(fd, size, flags=flags)
        self.tensor: torch.Tensor | None = torch.frombuffer(self._mmap, dtype=torch.uint8)

    @classmethod
    def create(cls, prefix: str, size: int) -> ShmSegment:
        """A new segment named `<prefix><random>`, mode 0600, locked by this process."""
        name = f"{prefix}{secrets.token_hex(8)}"
        fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Reserve the pages now: a full /dev/shm fails here, not later with SIGBUS on write.
            os.posix_fallocate(fd, 0, size)
            return cls(name, fd, size, owner=True)
        except BaseException:
            os.close(fd)
            (SHM_DIR / name).unlink(missing_ok=True)
            raise

    @classmethod
    def attach(cls, name: str, size: int) -> ShmSegment:
        """Map an existing segment read-write (consumers write their acknowledgement into it).

        Raises FileNotFoundError if it does not exist, ValueError if its size differs from `size`.
        """
        if "/" in name or not name:
            raise ValueError(f"invalid shared-memory segment name {name!r}")
        fd = os.open(SHM_DIR / name, os.O_RDWR)
        try:
            actual = os.fstat(fd).st_size
            if actual != size:
                raise ValueError(f"segment {name} has {actual} bytes, handle says {size}")
            return cls(name, fd, size, owner=False)
        except BaseException:
            os.close(fd)
            raise

    def owner_alive(self) -> bool:
        """False once the creating process has exited or unlinked the segment."""
        if os.fstat(self._fd).st_nlink == 0:
            return False
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True  # the owner's exclusive lock is still held
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        return False

    def close(self) -> None:
        """Unmap; the owner also unlinks the name. Idempotent."""
        if self._mmap is None:
            return
        if self.owner:
            (SHM_DIR / self.name).unlink(missing_ok=True)
        self.tensor = None
        # A caller may still hold a view of `tensor`; then the mapping lives until that view dies.
        with contextlib.suppress(BufferError):
            self._mmap.close()
        self._mmap = None
        os.close(self._fd)


def sweep_stale(prefix: str = "epd-") -> list[str]:
    """Unlink segments named `prefix*` whose creator is dead; returns the names removed."""
    removed = []
    for path in SHM_DIR.glob(f"{prefix}*"):
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue  # gone meanwhile, or another user's
        try:
            st = os.fstat(fd)
            if st.st_size == 0 and time.time() - st.st_mtime < _CREATING_GRACE_S:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink(missing_ok=True)
            removed.append(path.name)
        except BlockingIOError:
            pass  # owner alive
        finally:
            os.close(fd)
    return removed
