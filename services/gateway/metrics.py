"""Prometheus metrics of the gateway."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "epd_gateway_requests", "Chat requests by HTTP status", ["status"], registry=r
        )
        self.in_flight = Gauge("epd_gateway_in_flight_requests", "Requests in progress", registry=r)
        self.ttft = Histogram(
            "epd_gateway_ttft_seconds", "Language call to first token", registry=r, buckets=_BUCKETS
        )
        self.e2e = Histogram(
            "epd_gateway_e2e_seconds", "Whole request, images included", registry=r,
            buckets=_BUCKETS,
        )  # fmt: skip
        self.images = Counter(
            "epd_gateway_images", "Images encoded, by encoder cache result", ["cache"], registry=r
        )
        self.video_requests = Counter(
            "epd_gateway_video_requests", "Chat requests carrying videos", registry=r
        )
        self.video_tokens = Counter(
            "epd_gateway_video_tokens", "Video tokens encoded for requests", registry=r
        )
        self.rejected = Counter(
            "epd_gateway_rejected", "Requests shed before any work, by reason", ["reason"],
            registry=r,
        )  # fmt: skip
        # Retries, one counter per stage, labelled by cause.
        self.encoder_retries = Counter(
            "epd_gateway_encoder_retries", "Encode attempts retried on another encoder, by the "
            "failed attempt's gRPC code", ["code"], registry=r,
        )  # fmt: skip
        self.image_retries = Counter(
            "epd_gateway_image_retries", "Requests whose images were encoded again because the "
            "language replica could not pull one, by transfer reason", ["reason"], registry=r,
        )  # fmt: skip
        self.language_retries = Counter(
            "epd_gateway_language_retries", "Requests moved to another language replica before "
            "their first token, by cause (unreachable, not_serving, busy)", ["cause"], registry=r,
        )  # fmt: skip
        self.marked_down = Counter(
            "epd_gateway_backends_marked_down", "Backends taken out of rotation after a failed "
            "call (health checks bring them back), by pool", ["pool"], registry=r,
        )  # fmt: skip
