"""Prometheus metrics of the encoder service: its autoscaling signals (queue depth, pool bytes),
batching and latency histograms, cache counters, and the transfer layer's counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.transfer import metrics as transfer_metrics

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class EncoderMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge(
            "epd_encoder_queue_depth", "Images accepted and not yet answered", registry=r
        )
        self.batch_images = Histogram(
            "epd_encoder_batch_images", "Images per vision tower forward", registry=r,
            buckets=_BATCH_BUCKETS,
        )  # fmt: skip
        self.batch_patches = Histogram(
            "epd_encoder_batch_patches", "Patches per vision tower forward", registry=r,
            buckets=(256, 1024, 4096, 16384, 65536),
        )  # fmt: skip
        self.encode_seconds = Histogram(
            "epd_encoder_encode_seconds", "Wall time of one batched vision tower forward",
            registry=r, buckets=_LATENCY_BUCKETS,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "epd_encoder_request_seconds", "Encode call latency, arrival to reply", registry=r,
            buckets=_LATENCY_BUCKETS,
        )  # fmt: skip
        self.cache_hits = Counter(
            "epd_encoder_cache_hits", "Images answered without running the tower", registry=r
        )
        self.cache_misses = Counter(
            "epd_encoder_cache_misses", "Images that ran the tower", registry=r
        )
        self.cache_bytes = Gauge(
            "epd_encoder_cache_bytes", "Bytes of wire tensors held by the cache", registry=r
        )
        self.pool_bytes_in_use = Gauge(
            "epd_encoder_pool_bytes_in_use",
            "Transfer pool bytes held by published, unacknowledged tensors",
            registry=r,
        )
        self.video_frames_decoded = Counter(
            "epd_encoder_video_frames_decoded", "Video frames the decoder produced", registry=r
        )
        self.video_decode_seconds = Histogram(
            "epd_encoder_video_decode_seconds", "Seconds decoding one video (or chunk)",
            registry=r, buckets=_LATENCY_BUCKETS,
        )  # fmt: skip
        self.video_tokens = Counter(
            "epd_encoder_video_tokens", "Video tokens answered (cache hits included)", registry=r
        )
        self.rejected = Counter(
            "epd_encoder_rejected_images", "Images refused, by reason", ["reason"], registry=r
        )
        # The transfer layer counts into the process-wide default registry; export those here.
        r.register(transfer_metrics.TransferCollector())
