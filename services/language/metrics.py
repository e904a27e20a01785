"""Prometheus metrics of the language service: its autoscaling signals and latency histograms."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.transfer.metrics import TransferCollector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class LanguageMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.running = Gauge("epd_language_running_requests", "Requests being decoded", registry=r)
        self.waiting = Gauge(
            "epd_language_waiting_requests", "Requests queued for admission", registry=r
        )
        self.kv_usage = Gauge(
            "epd_language_kv_usage_ratio", "Fraction of KV cache blocks in use", registry=r
        )
        self.ttft = Histogram(
            "epd_language_ttft_seconds", "Time from arrival to first token", registry=r,
            buckets=_LATENCY_BUCKETS,
        )  # fmt: skip
        self.tpot = Histogram(
            "epd_language_tpot_seconds", "Time per output token after the first", registry=r,
            buckets=_LATENCY_BUCKETS,
        )  # fmt: skip
        self.generated_tokens = Counter(
            "epd_language_generated_tokens", "Tokens generated", registry=r
        )
        self.prompt_tokens = Counter("epd_language_prompt_tokens", "Prompt tokens", registry=r)
        self.prefix_hit_tokens = Counter(
            "epd_language_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
            registry=r,
        )  # fmt: skip
        self.preemptions = Counter(
            "epd_language_preemptions", "Requests preempted for KV space", registry=r
        )
        # The transfer layer counts into the process-wide default registry; export those here.
        r.register(TransferCollector())
        self.finished = Counter(
            "epd_language_requests", "Finished requests by reason", ["finish_reason"], registry=r
        )
