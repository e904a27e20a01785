"""An encoder host dies mid-transfer: two encoder hosts, two language hosts, a gateway host and
a client host (network namespaces on a bridge, as in test_multihost.py). All processes of one
encoder host are SIGKILLed while a language service is pulling a tensor from it; each request is
then retried elsewhere or fails within its deadline, nothing hangs, and the stack keeps serving
on the other encoder.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from bench.netns import loss_available
from tests.multihost.cluster import Cluster
from tests.multihost.test_multihost import DEADLINE_S, assert_all_ok

# The pull is held in flight by dropping the encoder host's packets (iptables).
REASON = loss_available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"multi-host tests: {REASON}")


@pytest.mark.parametrize("transport", ["nixl", "grpc"])
def test_encoder_host_killed_mid_transfer(tiny_model: Path, transport: str) -> None:
    cluster = Cluster(tiny_model, transport, encoders=2, languages=2)
    try:
        assert_all_ok(cluster.chat(4, seed=10, concurrency=2))  # both encoders known and warm
        victim = cluster["enc0"]
        encoded = cluster.metric("enc0", "epd_encoder_request_seconds_count")
        # Hold enc0's tensors on the wire: its packets to the language hosts are dropped, so a
        # pull from it is in flight (started, not finished) when the host dies.
        for lang in cluster.languages:
            victim.block(cluster[lang].address)
        load = cluster.start_chat(8, seed=500, concurrency=8, timeout_s=DEADLINE_S)
        # enc0 answered an Encode call: a language service has its handle and is pulling, and
        # that pull cannot finish while the block holds.
        cluster.wait_metric("enc0", "epd_encoder_request_seconds_count", above=encoded)
        time.sleep(1.0)
        started = time.monotonic()
        killed = victim.kill_all()
        victim.unblock()
        out, err = load.communicate(timeout=DEADLINE_S + 30)
        waited = time.monotonic() - started
        assert load.returncode == 0, err[-3000:]
        results = json.loads(out.strip().splitlines()[-1])
        # Reported, not asserted: how the gateway retries is its own business.
        retried = sum(cluster.metric("gateway", f"epd_gateway_{kind}_retries_total")
                      for kind in ("encoder", "image", "language"))  # fmt: skip
        failed = [r for r in results if not r["ok"]]
        print(f"{transport}: killed {len(killed)} processes of enc0 mid-transfer; "
              f"{len(results) - len(failed)}/{len(results)} requests succeeded, "
              f"{retried:.0f} gateway retries; "
              f"all done {waited:.1f} s after the kill")  # fmt: skip
        for r in failed:
            print(f"  failed after {r['seconds']:.1f} s: {r.get('error')}")
        assert killed
        assert len(results) == 8
        # Retried elsewhere, or failed within the deadline with a reason: never a hang.
        assert all(float(r["seconds"]) < DEADLINE_S for r in results), results
        assert all("error" in r for r in failed), failed
        # The stack keeps serving on the surviving encoder.
        assert_all_ok(cluster.chat(4, seed=900, concurrency=2))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"a request hung; gateway log:\n{cluster.log('gateway')}") from None
    finally:
        cluster.close()
