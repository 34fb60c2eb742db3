"""One unit of device work: a network call of one job, waiting to be batched with others."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..core import SharedRows

__all__ = ["WorkItem", "batch_key", "FORWARD", "VJP", "SOLO", "LEASE"]

FORWARD, VJP, SOLO, LEASE = "forward", "vjp", "solo", "lease"


def _signature(value) -> tuple | None:
    """What must agree for tensors to be concatenated: dtype, device, per-sample shape."""
    if value is None:
        return ("none",)
    if isinstance(value, torch.Tensor) and value.dim() >= 1:
        return ("tensor", value.dtype, value.device, tuple(value.shape[1:]))
    return None  # anything else (a dict of embeddings, a scalar) is not concatenated


def batch_key(kind: str, module, x: torch.Tensor, t: torch.Tensor, cond,
              cond_grad: bool = False, blocks: bool = False) -> tuple | None:
    """Calls with equal keys may share one network call; None: this call runs alone. Networks
    that declare :class:`~adjointdpm_server.core.SharedRows` (adapters of one base) share calls
    with each other, any other network only with itself."""
    parts = (_signature(x), _signature(t), _signature(cond))
    if any(p is None for p in parts):
        return None
    network = ("shared", module.shares) if isinstance(module, SharedRows) else id(module)
    return (kind, network, *parts, cond_grad, blocks)


@dataclass(eq=False)
class WorkItem:
    """``kind``: forward (no grad), vjp (inputs + cotangent → ε and input gradients), solo
    (a closure run alone on the engine thread: calls that build a graph for weight gradients)
    or lease (the engine thread waits while a job works on the device in its own thread)."""

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
    weights: tuple = ()  # vjp: this job's own weights to differentiate (``splits_weights``)
    blocks: bool = False  # vjp: checkpoint inside the network (core/_blocks.py)
    closure: Callable[[], Any] | None = None
    submitted: float = field(default_factory=time.monotonic)
    state: str = "pending"  # pending → running → done, or withdrawn
    result: Any = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    parent: "WorkItem | None" = None  # a chunk's item
    parts: list = field(default_factory=list)  # the results of this item's chunks, in order

    def split(self, rows: int) -> "WorkItem":
        """The first ``rows`` samples as a chunk of their own; this item keeps the rest (the
        engine runs them in order, so the chunks' results join into the unsplit call's)."""
        def cut(value):
            if isinstance(value, torch.Tensor) and value.dim() >= 1:
                return value[:rows], value[rows:]
            return value, value

        (x, self.x), (t, self.t) = cut(self.x), cut(self.t)
        (cond, self.cond), (cotangent, self.cotangent) = cut(self.cond), cut(self.cotangent)
        self.rows -= rows
        return WorkItem(self.kind, self.key, self.job, self.caller, self.model, rows,
                        module=self.module, x=x, t=t, cond=cond, cotangent=cotangent,
                        cond_grad=self.cond_grad, weights=self.weights, blocks=self.blocks,
                        submitted=self.submitted,
                        parent=self)

    def finish(self, result=None, error: BaseException | None = None) -> None:
        if self.parent is not None:  # a chunk: its result waits for the rest of the item
            parent, self.parent = self.parent, None
            if error is not None and parent.state in ("pending", "running"):
                parent.finish(error=error)
            elif parent.state in ("pending", "running"):
                parent.parts.append(result)
            return
        if error is None and self.parts:
            result = _join([*self.parts, result])
        self.parts = []
        self.result, self.error, self.state = result, error, "done"
        self.done.set()

    def release(self) -> None:
        """Drop the tensors (inputs, result: under backprop a graph of the whole solve so far),
        once the job has what it needs of them."""
        self.x = self.t = self.cond = self.cotangent = self.closure = self.result = None
        self.weights, self.parts = (), []


def _join(results: list):
    """Chunks' results as one: tensors (forward) or (ε, ∂x, ∂cond, ∂weights) (vjp): the first
    three along rows, the weights' gradients summed (each chunk's rows add theirs)."""
    if isinstance(results[0], torch.Tensor):
        return torch.cat(results)
    eps, gx, gc = (None if parts[0] is None else torch.cat(parts)
                   for parts in zip(*(r[:3] for r in results)))
    gw = tuple(sum(g[1:], g[0]) for g in zip(*(r[3] for r in results)))
    return eps, gx, gc, gw
