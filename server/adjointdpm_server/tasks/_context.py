"""What a task may use of the server, as a small typed interface (the service's ``Runtime``
implements it; tests and examples may pass their own)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from torch import nn

    from ..artifacts import ArtifactStore
    from ..config import Limits
    from ..engine import NetworkEngine
    from ..models import ModelBackend

__all__ = ["TaskContext"]


class TaskContext(Protocol):
    limits: Limits              # request limits, checked before allocating
    settings: dict              # what loss plugins may read (Triton address, CLIP directory)
    artifacts: ArtifactStore    # adapters, embeddings, checkpoints, weight gradients
    engine: NetworkEngine       # every network call goes through it (batched across jobs)

    def model(self, name: str = "") -> tuple[str, ModelBackend]:
        """(name, backend) of a resident model; the default one for ``""``; NOT_FOUND otherwise."""

    def adapted(self, model: str, adapter_id: str) -> nn.Module:
        """The model's ``eps_fn`` with an adapter artifact applied (a cached copy)."""
