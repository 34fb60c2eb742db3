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
    max_tensor_elements: int = 16 * 2**20       # one tensor in a request
    max_message_bytes: int = 64 * 2**20         # a gRPC message, either way
    max_inline_weight_elements: int = 4 * 2**20  # weight gradients sent inline (else an artifact)
    client_loss_timeout_s: float = 300.0         # how long to wait for a client's LossReply


@dataclass(frozen=True)
class ServerConfig:
    models: tuple[str, ...] = ("digits",)     # model specs; the first is the default
    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "cpu"
    dtype: str = "float32"
    artifact_dir: Path = Path("artifacts")
    max_concurrent_jobs: int = 1
    workers: int = 32                          # gRPC handler threads
    triton_url: str | None = None
    clip_model_dir: Path | None = None
    limits: Limits = field(default_factory=Limits)

    def loss_settings(self) -> dict:
        """What loss plugins may read (DESIGN.md §4: server-side plugins)."""
        return {"triton_url": self.triton_url,
                "clip_model_dir": str(self.clip_model_dir) if self.clip_model_dir else None}
