"""Why a call failed, carried across the wire so that the caller blames the right role.

A gRPC status code alone cannot say who is at fault: UNAVAILABLE from a language replica may mean
the replica is unreachable, or that the encoder holding one of the request's images died. So
every failure our servicers raise carries trailing metadata naming its cause:

    epd-cause             request | image | replica | internal
    epd-image-index       the failing image's index in the request (cause image)
    epd-producer          where that image's tensor was (its encoder), for logs and routing
    epd-transfer-reason   the transfer layer's reason (producer_lost, not_found, expired, ...)

A status without `epd-cause` did not come from our servicer: the connection failed, or gRPC
itself refused the call. Only those (and `replica`) say anything about the replica's health.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NoReturn

import grpc

CAUSE_KEY = "epd-cause"
IMAGE_KEY = "epd-image-index"
PRODUCER_KEY = "epd-producer"
REASON_KEY = "epd-transfer-reason"


class Cause(enum.StrEnum):
    REQUEST = "request"  # the caller's input is wrong: do not retry
    IMAGE = "image"  # an image could not be pulled or used: encode it again, same replica
    REPLICA = "replica"  # this replica cannot take the request now (loading, draining, full)
    INTERNAL = "internal"  # the replica failed on a valid request


@dataclass(frozen=True, slots=True)
class Fault:
    cause: Cause
    code: grpc.StatusCode
    message: str
    image_index: int | None = None
    producer: str = ""
    reason: str = ""  # the transfer layer's reason for an image fault

    def metadata(self) -> tuple[tuple[str, str], ...]:
        out = [(CAUSE_KEY, self.cause.value)]
        if self.image_index is not None:
            out.append((IMAGE_KEY, str(self.image_index)))
        if self.producer:
            out.append((PRODUCER_KEY, self.producer))
        if self.reason:
            out.append((REASON_KEY, self.reason))
        return tuple(out)

    async def abort(self, context: grpc.aio.ServicerContext) -> NoReturn:
        """End the servicer's call with this fault (raises, as `context.abort` does)."""
        await context.abort(self.code, self.message, self.metadata())
        raise AssertionError("context.abort returned")


def fault_of(error: grpc.aio.AioRpcError) -> Fault | None:
    """The fault a servicer of ours reported, or None for a connection-level or gRPC-made one."""
    meta = {k: v for k, v in (error.trailing_metadata() or ()) if isinstance(v, str)}
    raw = meta.get(CAUSE_KEY)
    if raw is None:
        return None
    try:
        cause = Cause(raw)
    except ValueError:
        cause = Cause.INTERNAL
    index = meta.get(IMAGE_KEY, "")
    return Fault(
        cause,
        error.code(),
        error.details() or "",
        int(index) if index.isdigit() else None,
        meta.get(PRODUCER_KEY, ""),
        meta.get(REASON_KEY, ""),
    )
