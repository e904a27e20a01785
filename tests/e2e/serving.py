"""Helpers for tests that run a service as a real `epd` process on port 0."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

EPD = str(Path(sys.executable).parent / "epd")


def wait_serving(proc: subprocess.Popen[str], lines: list[str], timeout: float = 60.0) -> int:
    """Read the process's log (stderr) until SERVING and return its gRPC port; the rest of the
    log is then collected into `lines` by a thread, so the process never blocks on its pipe."""
    end = time.monotonic() + timeout
    port = None
    while time.monotonic() < end:
        line = proc.stderr.readline() if proc.stderr else ""
        if not line:
            raise AssertionError(f"{proc.args} exited early:\n{''.join(lines)}")
        lines.append(line)
        if m := re.search(r"gRPC listening on [\d.]+:(\d+)", line):
            port = int(m.group(1))
        if "SERVING" in line and port is not None:
            threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True).start()
            return port
    raise AssertionError(f"{proc.args} not SERVING after {timeout} s:\n{''.join(lines)}")
