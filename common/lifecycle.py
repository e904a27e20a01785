"""One lifecycle for every role: create, start, serve until a signal, drain, stop.

A role (encoder, language, gateway) is a `Service`: it owns a `GrpcServer` and implements three
steps; everything else is done here, the same way for all of them:

    create (the role's own `create(cfg)`: nothing loaded, nothing listening)
    start_service: listen with health NOT_SERVING, then `load()` (weights, warm-up; the role
                   reports SERVING when it can take work), stopping again if loading fails
    serve_service: start, wait for SIGTERM/SIGINT, then
                   health NOT_SERVING -> `drain(grace)` (refuse new work, let the running work
                   finish within the grace period) -> stop the gRPC server -> `close()`;
                   or, when the role reports it can serve no more (`failed()` returns: a
                   tensor-parallel rank was lost), health NOT_SERVING -> stop without a drain
                   -> `close()` -> exit code 1, so that a supervisor (Kubernetes) restarts it
    stop_service:  the same stop without a signal or a drain (tests, embedding)
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Protocol

from prometheus_client import CollectorRegistry

from common.grpc_bootstrap import GrpcServer

log = logging.getLogger(__name__)

# Calls a drain left running (a stuck call, a tensor stream) get this long more at the stop.
AFTER_DRAIN_GRACE_S = 2.0
# A role that failed answers health NOT_SERVING this long before it stops listening, so that
# probes and the gateway's health checks see why (not just a refused connection).
FAILED_LINGER_S = 1.0


class Service(Protocol):
    server: GrpcServer

    @property
    def registry(self) -> CollectorRegistry:
        """The role's Prometheus metrics (served on --metrics-port)."""
        ...

    async def load(self) -> None:
        """Load weights and warm up while the server listens NOT_SERVING; report SERVING."""
        ...

    async def drain(self, grace_s: float) -> None:
        """Health is NOT_SERVING: refuse new work, return once the running work is done or
        `grace_s` has passed."""
        ...

    async def close(self) -> None:
        """After the server stopped: free what the role holds (engine, pools, channels)."""
        ...

    async def failed(self) -> str:
        """Returns (the reason) only when the role can no longer serve; `never_fails` for a
        role that cannot fail this way."""
        ...


async def never_fails() -> str:
    """`Service.failed` of a role whose process stays able to serve while it runs."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def start_service(service: Service) -> None:
    try:
        await service.server.start(service.registry)
        await service.load()
    except BaseException:
        await stop_service(service, 0)
        raise


async def stop_service(service: Service, grace: float | None = None) -> None:
    await service.server.stop(grace)
    await service.close()


async def serve_service(create: Callable[[], Service]) -> int:
    """Create (inside this event loop: gRPC's aio server binds to the loop it is made in),
    start, then serve until SIGTERM or SIGINT; drain and stop. Returns the exit code: 0, or 1
    when the role failed while serving."""
    service = create()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await start_service(service)
    stopped = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(service.failed())
    await asyncio.wait((stopped, failed), return_when=asyncio.FIRST_COMPLETED)
    if failed.done():
        stopped.cancel()
        log.error("cannot serve any more (%s): stopping with exit code 1", failed.result())
        await service.server.health.enter_graceful_shutdown()
        await asyncio.sleep(FAILED_LINGER_S)
        await stop_service(service, 0)
        return 1
    failed.cancel()
    grace = service.server.cfg.grace_s
    log.info("signal received: draining for up to %.0f s", grace)
    await service.server.health.enter_graceful_shutdown()
    await service.drain(grace)
    await stop_service(service, AFTER_DRAIN_GRACE_S)
    log.info("stopped")
    return 0
