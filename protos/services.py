"""Fully-qualified names of pdserve's gRPC services, and the standard services every server adds.

Each pdserve gRPC server (the router, every worker) registers its own servicers, then calls
`add_standard_services(server, [GENERATION_SERVICE])` (or `[WORKER_SERVICE]`), so that
Kubernetes gRPC probes, `grpc_health_probe` and `grpcurl` work against it.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.pdserve.v1 import generate_pb2, worker_pb2

GENERATION_SERVICE: str = generate_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
WORKER_SERVICE: str = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
HEALTH_SERVICE: str = health.SERVICE_NAME
REFLECTION_SERVICE: str = reflection.SERVICE_NAME

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def add_standard_services(
    server: grpc.Server | grpc.aio.Server,
    service_names: Iterable[str],
    *,
    status: int = SERVING,
) -> health.HealthServicer | health.aio.HealthServicer:
    """Registers grpc.health.v1.Health and server reflection on `server` (before it starts).

    Health answers for each of `service_names` and for the whole server (the empty name) with
    `status`; unknown names get NOT_FOUND. Reflection lists `service_names`, Health and
    Reflection itself. Works on a `grpc.Server` and a `grpc.aio.Server`; for the latter the
    returned servicer is the asyncio one, whose `set()` and `enter_graceful_shutdown()` are
    coroutines. Callers flip statuses later through the returned servicer, e.g. NOT_SERVING
    while a worker drains.
    """
    names = list(dict.fromkeys(service_names))
    initial = dict.fromkeys(["", *names], status)
    servicer: health.HealthServicer | health.aio.HealthServicer
    if isinstance(server, grpc.aio.Server):
        servicer = health.aio.HealthServicer()
        # The asyncio servicer's set() is a coroutine and nothing can watch a service before
        # the server starts, so the starting statuses go straight into its table.
        servicer._server_status.update(initial)
    else:
        servicer = health.HealthServicer()
        for name, name_status in initial.items():
            servicer.set(name, name_status)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection([*names, HEALTH_SERVICE, REFLECTION_SERVICE], server)
    return servicer
