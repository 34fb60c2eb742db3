"""Build and run the gRPC server: the service, standard health checking and reflection."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adjointdpm.v1 import adjointdpm_pb2, adjointdpm_pb2_grpc

from .config import ServerConfig
from .runtime import Runtime
from .service import AdjointDPMService

log = logging.getLogger("adjointdpm.server")

__all__ = ["SERVICE_NAME", "build_server", "Server"]

SERVICE_NAME = adjointdpm_pb2.DESCRIPTOR.services_by_name["AdjointDPM"].full_name


class Server:
    """A started server: ``port`` (the bound one), ``runtime``, ``stop(grace)``, ``wait()``."""

    def __init__(self, grpc_server, port: int, runtime: Runtime, health_servicer, service):
        self.grpc_server, self.port, self.runtime = grpc_server, port, runtime
        self.health, self.service = health_servicer, service

    def stop(self, grace: float | None = None) -> None:
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(grace).wait()

    def wait(self) -> None:
        self.grpc_server.wait_for_termination()


def build_server(config: ServerConfig, runtime: Runtime | None = None) -> Server:
    """Load the models (unless a runtime is given), bind ``host:port`` (0 = any free port), start."""
    runtime = runtime or Runtime(config)
    size = config.limits.max_message_bytes
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="adjointdpm-rpc"),
        options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)])
    service = AdjointDPMService(runtime)
    adjointdpm_pb2_grpc.add_AdjointDPMServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"could not bind {config.host}:{config.port}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s on %s:%d (models: %s)", SERVICE_NAME, config.host, port, ", ".join(runtime.models))
    return Server(server, port, runtime, health_servicer, service)
