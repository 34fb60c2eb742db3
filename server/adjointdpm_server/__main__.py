"""``adjointdpm-server`` / ``python -m adjointdpm_server``: load the models and serve.

    adjointdpm-server --model digits --port 50051
    adjointdpm-server --model sd15=diffusers:/models/sd-1.5 --device cuda --dtype float16 \\
        --tokens-file /etc/adjointdpm/tokens --tls-cert tls.crt --tls-key tls.key --metrics-port 9090

SIGTERM (or Ctrl-C) drains gracefully: health turns NOT_SERVING, new work is refused, running
jobs get ``--shutdown-grace`` seconds (fine-tunes write a checkpoint first), then the process
exits 0.
"""

from __future__ import annotations

import argparse
import os
import logging
import signal
import sys
import threading
from pathlib import Path

from .config import Limits, ServerConfig, caller_weights


def parse_args(argv=None) -> ServerConfig:
    p = argparse.ArgumentParser(prog="adjointdpm-server", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    p.add_argument("--model", action="append", dest="models", metavar="[NAME=]SPEC",
                   help="a model to keep resident (repeatable; the first is the default): digits, "
                        "digits-flow, gaussian-mixture, diffusers:/path (default: digits)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=50051, help="0 = any free port (printed)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16", "float64"))
    p.add_argument("--artifact-dir", type=Path, default=Path("artifacts"))
    p.add_argument("--artifact-store", default=os.environ.get("ADJOINTDPM_ARTIFACT_STORE"),
                   metavar="s3://BUCKET/PREFIX",
                   help="artifacts in an S3-compatible bucket (endpoint and credentials from the "
                        "AWS_* environment) instead of --artifact-dir; env ADJOINTDPM_ARTIFACT_STORE")
    p.add_argument("--coordination", default=os.environ.get("ADJOINTDPM_COORDINATION", "local"),
                   metavar="local|redis://HOST:PORT/DB",
                   help="where replicas share quotas, job slots and fine-tune leases: 'local' (one "
                        "replica) or Redis (N replicas); env ADJOINTDPM_COORDINATION")
    p.add_argument("--replica-id", help="this replica's name in the cluster (default: POD_NAME or "
                                        "the host name, and a nonce)")
    p.add_argument("--lease-seconds", type=float, default=30.0,
                   help="what a dead replica held (job leases, job slots, storage holds) lapses "
                        "after this long; renewed every third of it")
    p.add_argument("--artifact-retention-hours", type=float, default=24 * 7, help="0 = keep forever")
    p.add_argument("--max-active-jobs", "--max-concurrent-jobs", type=int, default=16,
                   help="jobs whose states are held in memory (their network calls are batched)")
    p.add_argument("--max-queue", type=int, default=32, help="waiting jobs; beyond: RESOURCE_EXHAUSTED")
    p.add_argument("--max-network-batch", type=int, default=64,
                   help="samples in one batched network call")
    p.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="how long a network call may wait for other jobs' calls; 0 = no batching")
    p.add_argument("--client-loss-timeout", type=float, default=Limits.client_loss_timeout_s,
                   help="seconds to wait for a client's loss reply (then DEADLINE_EXCEEDED)")
    p.add_argument("--max-request-seconds", type=float, default=3600.0)
    p.add_argument("--workers", type=int, default=64, help="gRPC handler threads")
    p.add_argument("--tokens-file", type=Path,
                   help="bearer tokens, one per line as TENANT:TOKEN or TOKEN (tenant 'default'); "
                        "also ADJOINTDPM_TOKENS=a,b")
    p.add_argument("--shared-artifacts", action="store_true",
                   help="every tenant sees every artifact (single-team deployments)")
    p.add_argument("--tenant-max-jobs", type=int, help="a tenant's active + queued jobs")
    p.add_argument("--tenant-max-queue", type=int,
                   help="a tenant's waiting jobs (default: --max-queue; a full queue still makes "
                        "room for a tenant that waits with fewer jobs than the longest)")
    p.add_argument("--max-parked-jobs", type=int,
                   help="jobs waiting for a client's loss reply without a slot (default: 2 × "
                        "--max-active-jobs); beyond, a waiting job keeps its slot")
    p.add_argument("--tenant-max-parked", type=int,
                   help="of them one tenant's (default: half of --max-parked-jobs)")
    p.add_argument("--tenant-weights", default="", metavar="NAME=W,…",
                   help="relative shares of slots and device time, e.g. alice=2,bob=1 (default 1)")
    p.add_argument("--adapter-cache-mib", type=float,
                   help="bytes of LoRA adapters kept resident per model, least recently used "
                        "evicted first, those in use never (default: 1024 on a CPU, a tenth of "
                        "an accelerator's memory)")
    p.add_argument("--multi-adapter-batching", choices=("on", "off"), default="on",
                   help="rows of different LoRA adapters of one model in one network call "
                        "(off: each adapter's calls batch only with its own)")
    p.add_argument("--engine-chunk-rows", type=int,
                   help="while other tenants wait, a larger network call runs in chunks of this "
                        "many samples (default: --max-network-batch)")
    p.add_argument("--tenant-storage-mib", type=float, help="a tenant's artifact storage")
    p.add_argument("--artifact-storage-mib", type=float, help="all artifacts together")
    p.add_argument("--max-health-watches", type=int, default=64,
                   help="concurrent Health/Watch streams, counted apart from other calls: a client "
                        "given several replicas holds one on each (health-checked round_robin)")
    p.add_argument("--protect-health", action="store_true", help="health checks need a token too")
    p.add_argument("--tls-cert", type=Path)
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--tls-client-ca", type=Path, help="require client certificates (mTLS)")
    p.add_argument("--health-port", type=int, help="also serve health on this plaintext port (probes)")
    p.add_argument("--metrics-port", type=int, help="Prometheus /metrics on this port")
    p.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds to drain on SIGTERM")
    p.add_argument("--max-connection-age", type=float, default=ServerConfig.max_connection_age_s,
                   help="seconds before a client connection is sent GOAWAY (its calls finish, within "
                        "--max-request-seconds): clients reconnect and re-resolve, reaching new "
                        "replicas; 0 = never")
    p.add_argument("--triton-url", help="host:port of a Triton server for the 'triton' loss")
    p.add_argument("--triton-allow", action="append", default=[], metavar="HOST:PORT",
                   help="another Triton address a request's 'url' parameter may name (repeatable)")
    p.add_argument("--clip-model-dir", type=Path, help="a local CLIP directory for 'clip_similarity'")
    p.add_argument("--aesthetic-model-dir", type=Path, help="a local directory for the 'aesthetic' reward: "
                   "a CLIP (vision tower + projection) and the LAION head (head.safetensors, head_config.json)")
    p.add_argument("--preference-model-dir", type=Path,
                   help="a local CLIP directory (PickScore kind) for the 'preference' reward")
    p.add_argument("--grad-memory-mib", type=int, help="a gradient's memory budget for grad_mode auto "
                   "(kept graphs + states); unset: half the device's free memory at the job's start")
    p.add_argument("--max-batch", type=int, default=Limits.max_batch)
    p.add_argument("--max-steps", type=int, default=Limits.max_steps)
    p.add_argument("--max-iterations", type=int, default=Limits.max_iterations)
    p.add_argument("--max-examples", type=int, default=Limits.max_examples)
    p.add_argument("--max-network-calls", type=int, default=Limits.max_network_calls,
                   help="a request's estimated network calls (steps × iterations × inner steps …); "
                        "more: INVALID_ARGUMENT before it starts; 0 = no bound")
    p.add_argument("--max-tensor-elements", type=int, default=Limits.max_tensor_elements)
    p.add_argument("--max-message-mib", type=int, default=Limits.max_message_bytes >> 20)
    p.add_argument("--log-format", choices=("json", "text"), default="json")
    a = p.parse_args(argv)
    from .wire.auth import load_tokens

    if bool(a.tls_cert) != bool(a.tls_key):
        p.error("--tls-cert and --tls-key go together")
    try:
        weights = caller_weights(a.tenant_weights)
    except ValueError as err:
        p.error(str(err))
    limits = Limits(max_batch=a.max_batch, max_steps=a.max_steps, max_iterations=a.max_iterations,
                    max_examples=a.max_examples, max_network_calls=max(0, a.max_network_calls),
                    max_tensor_elements=a.max_tensor_elements,
                    max_message_bytes=a.max_message_mib << 20,
                    client_loss_timeout_s=a.client_loss_timeout,
                    grad_memory_bytes=None if a.grad_memory_mib is None else max(0, a.grad_memory_mib) << 20)
    config = ServerConfig(
        models=tuple(a.models or ["digits"]), host=a.host, port=a.port, device=a.device, dtype=a.dtype,
        artifact_dir=a.artifact_dir, artifact_retention_s=a.artifact_retention_hours * 3600,
        artifact_store=a.artifact_store or None, coordination=a.coordination or "local",
        replica_id=a.replica_id, lease_s=a.lease_seconds,
        max_active_jobs=a.max_active_jobs, max_queue=a.max_queue,
        max_network_batch=a.max_network_batch, batch_window_ms=a.batch_window_ms,
        max_request_s=a.max_request_seconds, workers=a.workers,
        tokens=load_tokens(a.tokens_file), shared_artifacts=a.shared_artifacts,
        tenant_max_jobs=a.tenant_max_jobs, tenant_max_queue=a.tenant_max_queue,
        max_parked_jobs=a.max_parked_jobs, tenant_max_parked=a.tenant_max_parked,
        tenant_weights=weights, engine_chunk_rows=a.engine_chunk_rows,
        adapter_cache_mib=a.adapter_cache_mib,
        multi_adapter_batching=a.multi_adapter_batching == "on", tenant_storage_mib=a.tenant_storage_mib,
        artifact_storage_mib=a.artifact_storage_mib, max_health_watches=a.max_health_watches,
        health_open=not a.protect_health, tls_cert=a.tls_cert,
        tls_key=a.tls_key, tls_client_ca=a.tls_client_ca, health_port=a.health_port,
        max_connection_age_s=a.max_connection_age,
        metrics_port=a.metrics_port, shutdown_grace_s=a.shutdown_grace, triton_url=a.triton_url, triton_allowed_urls=tuple(a.triton_allow),
        clip_model_dir=a.clip_model_dir, aesthetic_model_dir=a.aesthetic_model_dir,
        preference_model_dir=a.preference_model_dir, limits=limits)
    return config, a.log_format


def _version() -> str:
    import adjointdpm_server  # its __version__: the installed distribution's, else the SDK's

    return adjointdpm_server.__version__


SERVER_MODULES = ("torch", "diffusers", "safetensors", "grpc_health.v1", "grpc_reflection.v1alpha",
                  "prometheus_client")


def _check_installed() -> None:
    """On an SDK-only install, say how to get the server instead of a traceback."""
    import importlib

    for name in SERVER_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            sys.exit(f"adjointdpm-server: the server is not installed here ({name} is missing). The "
                     "SDK alone cannot serve; install the server:\n"
                     "    pip install -c constraints.txt ./sdk ./server    (from a checkout; torch "
                     "first: pip install torch==2.13.0)")


def main(argv=None) -> None:
    _check_installed()
    config, log_format = parse_args(argv)
    from .telemetry.logs import configure_logging

    configure_logging(logging.INFO, json_lines=log_format == "json")
    from .telemetry import tracing

    if tracing.configure_from_env():  # OTEL_TRACES_EXPORTER / OTEL_EXPORTER_OTLP_ENDPOINT
        logging.getLogger("adjointdpm").info("tracing on (OpenTelemetry)")
    from .models import PrecisionUnsupported
    from .wire.server import build_server

    try:
        server = build_server(config)
    except PrecisionUnsupported as err:
        sys.exit(f"adjointdpm-server: {err}")
    print(f"adjointdpm-server listening on {config.host}:{server.port}", flush=True)
    done = threading.Event()

    def on_signal(signum, frame):
        if not done.is_set():
            done.set()
            threading.Thread(target=server.shutdown, name="adjointdpm-shutdown").start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.wait()
    sys.exit(0)


if __name__ == "__main__":
    main()
