"""`epd encoder` as a real process: SIGTERM finishes in-flight calls, hands off, then exits."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from common.rpc import encoder_pb2, encoder_pb2_grpc
from common.transfer import Consumer, host_id
from tests.e2e.serving import EPD, wait_serving

SHM_PREFIX = f"epd-test-encproc-{os.getpid()}-"


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_sigterm_finishes_in_flight_requests_before_exiting(tiny_model, png, transport):
    cmd = [
        EPD, "encoder", "--model", str(tiny_model), "--host", "127.0.0.1", "--port", "0",
        "--transport", transport, "--shm-prefix", SHM_PREFIX, "--pool-bytes", str(4 << 20),
        "--max-wait-ms", "800", "--grace-period", "10",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        port = wait_serving(proc, lines)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, Consumer() as consumer:
            stub = encoder_pb2_grpc.EncoderStub(channel)

            def request(i: int) -> encoder_pb2.EncodeRequest:
                image = encoder_pb2.ImageData(data=png(64 + 8 * i, 64, i))
                return encoder_pb2.EncodeRequest(images=[image], consumer_host=host_id())

            calls = [stub.Encode.future(request(i), timeout=30) for i in range(3)]
            time.sleep(0.3)  # all three wait in the 800 ms batch window
            assert not any(c.done() for c in calls)
            proc.send_signal(signal.SIGTERM)
            replies = [c.result() for c in calls]
            # Draining: new work is refused (the gateway retries it on another encoder) ...
            with pytest.raises(grpc.RpcError) as refused:
                stub.Encode(request(9), timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (refused.value.details() or "")
            # ... while what was published stays fetchable, over the server itself for grpc.
            tensors = [consumer.fetch(r.images[0].handle) for r in replies]
        assert proc.wait(timeout=30) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert {r.images[0].handle.WhichOneof("location") for r in replies} == {transport}
    assert [t.shape[0] for t in tensors] == [r.images[0].n_tokens for r in replies]
    log = "".join(lines)
    assert "signal received: draining" in log and "stopped" in log
    assert "never pulled" not in log  # every tensor was acknowledged within the hand-off
    assert not list(Path("/dev/shm").glob(f"{SHM_PREFIX}*"))
