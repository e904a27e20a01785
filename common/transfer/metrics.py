"""Prometheus metrics of the transfer layer, in the process-wide default registry.

Services export them with the rest of their metrics (`prometheus_client.generate_latest()`).
Labels: `backend` is shm / nixl / grpc; `role` is producer / consumer; `reason` is the failing
error's `reason` (see errors.py).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

TRANSFER_BYTES = Counter(
    "epd_transfer_bytes",
    "Tensor bytes published (producer) or fetched (consumer).",
    ["backend", "role"],
)
TRANSFERS = Counter(
    "epd_transfer_tensors",
    "Tensors published (producer) or fetched (consumer).",
    ["backend", "role"],
)
FAILURES = Counter(
    "epd_transfer_failures",
    "Failed publishes and fetches, by reason.",
    ["backend", "role", "reason"],
)
POOL_BYTES_IN_USE = Gauge(
    "epd_transfer_pool_bytes_in_use",
    "Bytes of producer pools held by published, not yet reclaimed tensors.",
)
POOL_BYTES_CAPACITY = Gauge(
    "epd_transfer_pool_bytes_capacity",
    "Total bytes of producer pools in this process.",
)
FETCH_SECONDS = Histogram(
    "epd_transfer_fetch_seconds",
    "Consumer wall time of one fetch, from call to data in its buffer and acknowledged.",
    ["backend"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0),
)


class TransferCollector(Collector):
    """Re-exports these metrics in a service's own registry (`registry.register(...)`)."""

    def collect(self) -> Iterator[Metric]:
        for m in (TRANSFER_BYTES, TRANSFERS, FAILURES, POOL_BYTES_IN_USE, POOL_BYTES_CAPACITY,
                  FETCH_SECONDS):  # fmt: skip
            yield from m.collect()
