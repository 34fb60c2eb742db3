"""One unit of device work: a network call of one job, waiting to be batched with others."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["WorkItem", "batch_key", "FORWARD", "VJP", "SOLO"]

FORWARD, VJP, SOLO = "forward", "vjp", "solo"


def _signature(value) -> tuple | None:
    """What must agree for tensors to be concatenated: dtype, device, per-sample shape."""
    if value is None:
        return ("none",)
    if isinstance(value, torch.Tensor) and value.dim() >= 1:
        return ("tensor", value.dtype, value.device, tuple(value.shape[1:]))
    return None  # anything else (a dict of embeddings, a scalar) is not concatenated


def batch_key(kind: str, module, x: torch.Tensor, t: torch.Tensor, cond,
              cond_grad: bool = False) -> tuple | None:
    """Calls with equal keys may share one network call; None: this call runs alone."""
    parts = (_signature(x), _signature(t), _signature(cond))
    if any(p is None for p in parts):
        return None
    return (kind, id(module), *parts, cond_grad)


@dataclass(eq=False)
class WorkItem:
    """``kind``: forward (no grad), vjp (inputs + cotangent → ε and input gradients) or solo
    (a closure run alone on the engine thread: calls that build a graph for weight gradients)."""

    kind: str
    key: tuple | None
    job: Any
    caller: str
    model: str
    rows: int
    module: Any = None
    x: torch.Tensor | None = None
    t: torch.Tensor | None = None
    cond: Any = None
    cotangent: torch.Tensor | None = None
    cond_grad: bool = False
    closure: Callable[[], Any] | None = None
    submitted: float = field(default_factory=time.monotonic)
    state: str = "pending"  # pending → running → done, or withdrawn
    result: Any = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def finish(self, result=None, error: BaseException | None = None) -> None:
        self.result, self.error, self.state = result, error, "done"
        self.done.set()

    def release(self) -> None:
        """Drop the tensors (inputs, result: under backprop a graph of the whole solve so far),
        once the job has what it needs of them."""
        self.x = self.t = self.cond = self.cotangent = self.closure = self.result = None
