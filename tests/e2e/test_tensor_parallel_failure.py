"""A tensor-parallel language replica whose worker dies (SIGKILL) or hangs (SIGSTOP) mid-request,
as real processes: the request fails with UNAVAILABLE within 30 s, health turns NOT_SERVING, the
service exits 1 (so Kubernetes restarts it), and none of its worker processes is left behind."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time

import grpc
import pytest

from common.grpc_bootstrap import health_check
from common.rpc import language_pb2, language_pb2_grpc
from tests.e2e.serving import EPD, wait_serving

BOUND_S = 30.0


def start_tp_language(model, tp: int, *args: str) -> tuple[subprocess.Popen[str], str, list[int],
                                                             list[str]]:  # fmt: skip
    cmd = [EPD, "language", "--model", str(model), "--host", "127.0.0.1", "--port", "0",
           "--kv-cache-bytes", str(16 << 20), "--tensor-parallel-size", str(tp), *args]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        port = wait_serving(proc, lines, timeout=120)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    spawned = next(line for line in lines if "spawned ranks" in line)
    pids = [int(p) for p in re.findall(r"\d+", spawned.split("pids")[1])]
    assert len(pids) == tp - 1
    return proc, f"127.0.0.1:{port}", pids, lines


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def long_request() -> language_pb2.GenerateRequest:
    sampling = language_pb2.SamplingParams(max_tokens=4000, temperature=0.0, ignore_eos=True)
    return language_pb2.GenerateRequest(prompt_token_ids=list(range(100, 130)), sampling=sampling)


@pytest.mark.parametrize(("tp", "sig", "extra"), [
    (4, signal.SIGKILL, ()),  # a dead worker: gloo sees its sockets close at once
    (2, signal.SIGSTOP, ("--distributed-timeout", "3")),  # a hung one: the collective timeout
], ids=["killed", "hung"])  # fmt: skip
def test_a_lost_worker_fails_the_request_and_the_replica(tiny_model, tp, sig, extra):
    proc, address, pids, lines = start_tp_language(tiny_model, tp, *extra)
    victim = pids[len(pids) // 2]
    try:
        with grpc.insecure_channel(address) as channel:
            stream = language_pb2_grpc.LanguageStub(channel).Generate(long_request(), timeout=120)
            first = next(stream)
            assert first.HasField("tokens")  # mid-request: decoding has begun
            os.kill(victim, sig)
            killed_at = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                for _ in stream:
                    pass
            failed_after = time.monotonic() - killed_at
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert "rank" in err.value.details() and failed_after < BOUND_S
        statuses = set()
        while proc.poll() is None and time.monotonic() - killed_at < BOUND_S:
            with contextlib.suppress(grpc.RpcError):
                statuses.add(health_check(address, timeout=0.5))
            time.sleep(0.05)
        assert "NOT_SERVING" in statuses
        assert proc.wait(timeout=BOUND_S) == 1, "".join(lines)
        assert not [p for p in pids if alive(p)], "worker processes left behind"
    finally:
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_workers_exit_with_a_killed_rank_0(tiny_model):
    """SIGKILL of the service itself (no stop, no pipe message): its workers die with it."""
    proc, _, pids, _ = start_tp_language(tiny_model, 2)
    try:
        proc.kill()
        proc.wait()
        end = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < end:
            time.sleep(0.05)
        assert not [p for p in pids if alive(p)], "a worker outlived rank 0"
    finally:
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
