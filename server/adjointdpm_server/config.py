"""Server configuration: one dataclass, filled from command-line flags (``__main__``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Limits:
    """Request limits, all checked before anything is allocated."""

    max_batch: int = 64
    max_steps: int = 1000
    max_iterations: int = 1000
    max_examples: int = 256
    max_network_calls: int = 4_000_000          # a request's estimated network calls (tasks/_work.py); 0 = no bound
    max_tensor_elements: int = 16 * 2**20       # one tensor in a request
    max_message_bytes: int = 64 * 2**20         # a gRPC message, either way
    max_inline_weight_elements: int = 4 * 2**20  # weight gradients sent inline (else an artifact)
    max_lora_rank: int = 256
    client_loss_timeout_s: float = 60.0          # how long to wait for a client's LossReply
    working_dtype: str = "float32"               # client numbers must be finite and safe in it
    grad_memory_bytes: int | None = None         # a gradient's budget (auto); None: half the free memory


@dataclass(frozen=True)
class ServerConfig:
    models: tuple[str, ...] = ("digits",)     # model specs; the first is the default
    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "cpu"
    dtype: str = "float32"
    artifact_dir: Path = Path("artifacts")
    artifact_store: str | None = None          # s3://bucket/prefix; None = artifact_dir
    coordination: str = "local"                # cluster state: "local" (one replica) or redis://…
    replica_id: str | None = None              # this replica's name; None = POD_NAME or host + nonce
    lease_s: float = 30.0                      # what a replica holds lapses this long after it dies
    artifact_retention_s: float = 7 * 24 * 3600.0  # 0 = keep forever
    max_active_jobs: int = 16                  # jobs whose states are held in memory
    max_queue: int = 32                        # waiting jobs beyond the active ones
    max_network_batch: int = 64                # samples in one batched network call
    batch_window_ms: float = 5.0               # how long a network call waits for others; 0 = off
    max_request_s: float = 3600.0              # a job's wall-clock cap (the client's deadline may be shorter)
    workers: int = 64                          # concurrent calls (health checks are not counted)
    max_health_watches: int = 64               # concurrent Health/Watch streams (one per health-checked client process), counted apart
    tokens: tuple[str, ...] = ()               # "TENANT:TOKEN" or "TOKEN" (tenant default); empty = no auth
    shared_artifacts: bool = False             # every tenant sees every artifact (single-team servers)
    tenant_max_jobs: int | None = None         # a tenant's active + queued jobs
    tenant_max_queue: int | None = None        # a tenant's waiting jobs; None = max_queue
    max_parked_jobs: int | None = None         # jobs parked on a client without a slot; None = 2 × max_active_jobs
    tenant_max_parked: int | None = None       # of them one tenant's; None = half of max_parked_jobs
    tenant_weights: tuple[tuple[str, float], ...] = ()  # (caller, weight): admission and device share
    engine_chunk_rows: int | None = None       # a call's rows while others wait; None = max_network_batch
    adapter_cache_mib: float | None = None     # LoRA adapters resident per model; None = per device
    multi_adapter_batching: bool = True        # different adapters of one model share calls
    tenant_storage_mib: float | None = None    # a tenant's artifact bytes, checkpoints included
    artifact_storage_mib: float | None = None  # all artifacts together
    health_open: bool = True                   # health checks need no token
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None          # set: mutual TLS
    health_port: int | None = None             # a plaintext health-only port (kubelet probes under TLS)
    metrics_port: int | None = None            # Prometheus /metrics; None = off
    shutdown_grace_s: float = 30.0             # SIGTERM: drain this long, then cancel
    max_connection_age_s: float = 600.0        # GOAWAY a connection this old: clients re-resolve; 0 = never
    triton_url: str | None = None
    triton_allowed_urls: tuple[str, ...] = ()  # other Triton addresses a request may name
    clip_model_dir: Path | None = None
    aesthetic_model_dir: Path | None = None    # the 'aesthetic' reward: a CLIP + LAION head (losses/_aesthetic.py)
    preference_model_dir: Path | None = None   # the 'preference' reward: a CLIP of the PickScore kind
    limits: Limits = field(default_factory=Limits)

    def loss_settings(self) -> dict:
        """What loss plugins may read (docs/design.md §4: server-side plugins)."""
        return {"triton_url": self.triton_url, "triton_allowed_urls": self.triton_allowed_urls,
                "clip_model_dir": str(self.clip_model_dir) if self.clip_model_dir else None,
                "aesthetic_model_dir": str(self.aesthetic_model_dir) if self.aesthetic_model_dir else None,
                "preference_model_dir": str(self.preference_model_dir) if self.preference_model_dir else None}


TENANT_CALLER = "tenant:"  # a caller that is a tenant (wire.auth.caller_of names callers so)


def caller_weights(spec: str) -> tuple[tuple[str, float], ...]:
    """``--tenant-weights alice=2,bob=0.5`` → ((caller, weight), …); a name is a tenant
    (``tenant:alice``), a name with a colon a caller as the server names it (``peer:10.0.0.7``)."""
    weights = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, value = part.rpartition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not eq or not name or not weight > 0 or weight == float("inf"):
            raise ValueError(f"--tenant-weights: {part!r} is not NAME=WEIGHT with a positive weight")
        weights.append((name if ":" in name else TENANT_CALLER + name, weight))
    return tuple(weights)
