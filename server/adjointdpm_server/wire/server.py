"""Build and run the gRPC server: the service behind telemetry and auth interceptors, standard
health checking and reflection, TLS/mTLS, Prometheus metrics, graceful shutdown.

Clients that follow replicas (docs/design.md): a connection older than
``max_connection_age_s`` is sent GOAWAY (its calls go on, up to ``max_request_s``), so clients
reconnect and re-resolve and reach new replicas; a drain turns health NOT_SERVING and sends
GOAWAY at once, so health-checked round_robin clients pick other replicas while the calls in
flight finish here."""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adjointdpm.v1 import adjointdpm_pb2, adjointdpm_pb2_grpc

from ..config import ServerConfig
from ..runtime import Runtime
from ..telemetry.metrics import Metrics
from .auth import Tenants, TokenAuthInterceptor, server_credentials
from .call_limit import CallLimitInterceptor, pool_size
from .servicer import AdjointDPMService
from .telemetry import TelemetryInterceptor

log = logging.getLogger("adjointdpm.server")

__all__ = ["SERVICE_NAME", "build_server", "Server", "connection_options"]

SERVICE_NAME = adjointdpm_pb2.DESCRIPTOR.services_by_name["AdjointDPMService"].full_name
HEALTH_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
AGE_GRACE_SLACK_S = 30.0  # a GOAWAY'd connection's calls: max_request_s, plus a queue wait
DRAIN_SLACK_S = 35.0      # gRPC's own grace on a drain: the drain's, its 30 s of cancelling, more
GOAWAY_SETTLE_S = 0.5     # after the GOAWAY, before refusing work: calls already accepted get in
HEALTH_SETTLE_S = 1.0     # NOT_SERVING before the GOAWAY: health-checked clients pick elsewhere first
_MAX_MS = 2**31 - 1       # gRPC reads these options as a C int


def connection_options(config: ServerConfig) -> list[tuple[str, int]]:
    """gRPC server options: GOAWAY a connection ``max_connection_age_s`` old (gRPC adds ±10 %
    jitter), and let its calls finish for as long as the longest call may last."""
    if config.max_connection_age_s <= 0:
        return []
    age_ms = max(1, round(config.max_connection_age_s * 1000))
    grace_ms = round((config.max_request_s + AGE_GRACE_SLACK_S) * 1000)
    return [("grpc.max_connection_age_ms", min(age_ms, _MAX_MS)),
            ("grpc.max_connection_age_grace_ms", min(grace_ms, _MAX_MS))]


class Server:
    """A started server: ``port`` (bound), ``health_port``, ``metrics_port``, ``runtime``,
    ``service``; ``shutdown(grace)`` drains gracefully, ``stop(grace)`` just stops."""

    def __init__(self, grpc_server, port, runtime, health_servicer, service, metrics,
                 health_server=None, health_port=None, metrics_port=None):
        self.grpc_server, self.port, self.runtime = grpc_server, port, runtime
        self.health, self.service, self.metrics = health_servicer, service, metrics
        self.health_server, self.health_port, self.metrics_port = health_server, health_port, metrics_port
        self._stopped = threading.Event()
        self._janitor = threading.Thread(target=self._expire_artifacts, daemon=True,
                                         name="adjointdpm-artifact-expiry")
        self._janitor.start()

    def _expire_artifacts(self) -> None:
        retention = self.runtime.config.artifact_retention_s
        while retention > 0 and not self._stopped.wait(min(600.0, retention / 10)):
            self.runtime.artifacts.expire(retention)

    def shutdown(self, grace: float | None = None) -> bool:
        """SIGTERM: health → NOT_SERVING (health-checked clients stop picking this replica), a
        second later GOAWAY on every connection and no new call (``grpc_server.stop`` with a grace: gRPC
        core sends GOAWAY at once and lets the calls in flight go on; clients send new calls to
        other replicas, a stream racing the GOAWAY is refused by the transport and retried
        transparently), a moment for calls already accepted to be admitted, then refuse new
        work, drain running jobs (fine-tunes write a checkpoint first) within ``grace`` seconds,
        cancel the rest, stop. True if all drained."""
        grace = self.runtime.config.shutdown_grace_s if grace is None else grace
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        # health-checked clients see NOT_SERVING on their Watch at once and stop picking this
        # replica; only then the GOAWAY, so none of their streams races it (a bidi stream that
        # does is lost: it cannot be retried once its first message is sent)
        time.sleep(min(HEALTH_SETTLE_S, grace / 4))
        self.grpc_server.stop(grace + DRAIN_SLACK_S)  # GOAWAY now; the calls in flight go on
        # a call the transport took just before its GOAWAY still reaches admission and runs
        # (refused there, it would fail unretried if it is a bidi stream)
        settle = min(GOAWAY_SETTLE_S, grace / 4)
        time.sleep(settle)
        settle += min(HEALTH_SETTLE_S, grace / 4)
        log.info("draining for up to %.0f s", grace)
        drained = self.service.drain(grace - settle)
        log.info("drained" if drained else "grace period over: remaining jobs cancelled")
        self.stop(5.0)
        return drained

    def stop(self, grace: float | None = None) -> None:
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(grace).wait()
        self.runtime.engine.close()
        if self.health_server is not None:
            self.health_server.stop(None).wait()
        self.runtime.cluster.close()   # its lease renewals: what it held lapses
        self.runtime.artifacts.close()
        if self.metrics is not None:
            self.metrics.close()

    def wait(self) -> None:
        self.grpc_server.wait_for_termination()


def _bind(server, address: str, config: ServerConfig) -> int:
    if config.tls_cert:
        creds = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    return port


def build_server(config: ServerConfig, runtime: Runtime | None = None) -> Server:
    """Load the models (unless a runtime is given), bind ``host:port`` (0 = any free port), start."""
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ValueError("TLS needs both a certificate and a key")
    runtime = runtime or Runtime(config)
    runtime.artifacts.expire(config.artifact_retention_s)
    metrics = Metrics(device=config.device)
    service = AdjointDPMService(runtime, metrics)
    metrics.watch(service.admission, runtime.engine)
    metrics.watch_banks(runtime.banks)
    metrics.watch_cluster(runtime.cluster)
    runtime.cluster.start()
    tenants = Tenants(config.tokens) if config.tokens else None
    interceptors = [TelemetryInterceptor(metrics, tenants)]
    if tenants is not None:
        interceptors.append(TokenAuthInterceptor(tenants, health_open=config.health_open))
    interceptors.append(CallLimitInterceptor(config.workers, config.max_health_watches,
                                             by_tenant=tenants is not None))
    size = config.limits.max_message_bytes
    server = grpc.server(  # no maximum_concurrent_rpcs: it would count health checks too
        futures.ThreadPoolExecutor(max_workers=pool_size(config.workers, config.max_health_watches),
                                   thread_name_prefix="adjointdpm-rpc"),
        interceptors=interceptors,
        options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size),
                 *connection_options(config)])
    adjointdpm_pb2_grpc.add_AdjointDPMServiceServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, HEALTH_NAME, reflection.SERVICE_NAME), server)
    port = _bind(server, f"{config.host}:{config.port}", config)
    health_server = health_port = None
    if config.health_port is not None:  # plaintext, health only: for kubelet probes under TLS/auth
        health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=pool_size(0, 2)),
                                    interceptors=[CallLimitInterceptor(0, 2)])
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_port = health_server.add_insecure_port(f"{config.host}:{config.health_port}")
        health_server.start()
    metrics_port = metrics.serve(config.metrics_port, config.host) if config.metrics_port is not None else None
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s on %s:%d (models: %s; tls: %s; auth: %s; metrics: %s)", SERVICE_NAME,
             config.host, port, ", ".join(runtime.models), bool(config.tls_cert), bool(config.tokens),
             metrics_port)
    return Server(server, port, runtime, health_servicer, service, metrics, health_server,
                  health_port, metrics_port)
