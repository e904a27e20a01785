"""A backend that DNS stops listing: the gateway's calls in flight on it finish, they are not
cancelled (a cancellation reached the HTTP handler, which dropped its client without a reply)."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gateway.backends import BackendPool


class SlowHealth(health_pb2_grpc.HealthServicer):
    async def Check(self, request, context):  # type: ignore[no-untyped-def]
        if request.service == "slow":
            await asyncio.sleep(1.0)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def test_calls_in_flight_on_a_removed_backend_finish() -> None:
    async def body() -> None:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(SlowHealth(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        pool = BackendPool("encoder", [f"127.0.0.1:{port}"], refresh_s=60)
        try:
            await pool.refresh()
            (backend,) = pool.backends.values()
            stub = health_pb2_grpc.HealthStub(backend.channel)
            call = asyncio.ensure_future(
                stub.Check(health_pb2.HealthCheckRequest(service="slow"), timeout=10)
            )
            await asyncio.sleep(0.2)
            pool.targets = ["127.0.0.1:9"]  # the old address is gone from "DNS"
            await pool.refresh()
            assert f"127.0.0.1:{port}" not in pool.backends
            reply = await call  # raised CancelledError when removal closed the channel at once
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await pool.stop()
            await server.stop(0)

    asyncio.run(body())
