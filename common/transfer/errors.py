"""Transfer errors: one class per failure a caller must tell apart.

Each carries a short `reason` (the metrics label) and the gRPC status a servicer should answer
with, so services translate errors without a lookup table of their own.
"""

from __future__ import annotations

import grpc


class TransferError(Exception):
    """Base class: the tensor could not be published or fetched."""

    reason = "error"
    code = grpc.StatusCode.INTERNAL


class PoolExhaustedError(TransferError):
    """The producer's pool has no room; publish failed at once (never waits for consumers)."""

    reason = "pool_exhausted"
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class TensorNotFoundError(TransferError):
    """Unknown id, or the tensor was already acknowledged or released."""

    reason = "not_found"
    code = grpc.StatusCode.NOT_FOUND


class TensorExpiredError(TransferError):
    """The handle's lease ended; the producer may have reused its memory."""

    reason = "expired"
    code = grpc.StatusCode.FAILED_PRECONDITION


class WrongHostError(TransferError):
    """A shared-memory handle reached a consumer on another host."""

    reason = "wrong_host"
    code = grpc.StatusCode.FAILED_PRECONDITION


class TensorSpecError(TransferError, ValueError):
    """Malformed handle, or an `out` buffer whose dtype/shape/device does not match it."""

    reason = "bad_spec"
    code = grpc.StatusCode.INVALID_ARGUMENT


class ChecksumMismatchError(TransferError):
    """The bytes that arrived do not match the handle's CRC-32."""

    reason = "checksum"
    code = grpc.StatusCode.DATA_LOSS


class TransferTimeoutError(TransferError, TimeoutError):
    """The fetch deadline passed; the in-flight transfer was aborted before returning."""

    reason = "timeout"
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ProducerLostError(TransferError):
    """The producer process died or disconnected during (or before) the transfer."""

    reason = "producer_lost"
    code = grpc.StatusCode.UNAVAILABLE


class BackendUnavailableError(TransferError):
    """The configured backend cannot run here (e.g. NIXL not installed)."""

    reason = "backend_unavailable"
    code = grpc.StatusCode.UNIMPLEMENTED


# reason -> class, for turning a remote error (gRPC trailing metadata) back into the same class.
BY_REASON: dict[str, type[TransferError]] = {
    cls.reason: cls
    for cls in (
        TransferError,
        PoolExhaustedError,
        TensorNotFoundError,
        TensorExpiredError,
        WrongHostError,
        TensorSpecError,
        ChecksumMismatchError,
        TransferTimeoutError,
        ProducerLostError,
        BackendUnavailableError,
    )
}
