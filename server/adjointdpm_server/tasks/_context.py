"""What a task may use of the server, as a small typed interface (the service's ``Runtime``
implements it; tests and examples may pass their own)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, ContextManager, Protocol

if TYPE_CHECKING:
    from torch import nn

    from ..cluster import Coordination
    from ..config import Limits
    from ..models import ModelBackend
    from ..storage.artifacts import ArtifactStore

__all__ = ["TaskContext", "NetworkCalls"]


class NetworkCalls(Protocol):
    """What a task asks of whatever runs its network calls (the server's ``NetworkEngine``,
    which batches them across jobs): nothing else of it, and never its attributes."""

    def network(self, module: nn.Module, job, model: str = "") -> Callable:
        """``module`` as this job's ``eps_fn``: its calls go through the engine."""

    def gradient_jobs(self, job) -> int:
        """How many gradient jobs run now, ``job`` included (kept graphs share the budget)."""

    def shares_calls(self, job) -> bool:
        """Whether ``job``'s gradient calls now would batch with other jobs' (``auto`` then
        keeps no graphs)."""

    def exclusive(self, job) -> ContextManager:
        """The device for work ``job`` does in its own thread (a weight-training backward pass),
        as one turn of the fair share."""


class TaskContext(Protocol):
    limits: Limits              # request limits, checked before allocating
    settings: dict              # what loss plugins may read (Triton address, CLIP directory)
    artifacts: ArtifactStore    # adapters, embeddings, checkpoints, weight gradients
    engine: NetworkCalls        # every network call goes through it (batched across jobs)
    cluster: Coordination       # what replicas share: job leases and the job registry
    tenant: str                 # whose request this is (its jobs are its own)

    def model(self, name: str = "") -> tuple[str, ModelBackend]:
        """(name, backend) of a resident model; the default one for ``""``; NOT_FOUND otherwise."""

    def adapted(self, model: str, adapter_id: str) -> nn.Module:
        """The model's ``eps_fn`` with an adapter artifact applied (``""``: none): a LoRA
        adapter is a row of the model's adapter bank, a full fine-tune a cached copy."""

    def new_lora(self, model: str, rank: int, alpha: float | None, targets) -> nn.Module:
        """A fresh trainable LoRA adapter on the model (B = 0), a row of its adapter bank."""
