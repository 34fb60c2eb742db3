"""What a running task may do besides computing: report events, ask the client, stop early.

The service implements ``Job`` over a gRPC stream; in-process callers (tests, examples) can use
``LocalJob``. Tasks call ``check()`` between solver steps, so a cancelled request stops within one.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..errors import Cancelled, DeadlineExceeded, FailedPrecondition
from ..losses import LossAnswer, check_reply

__all__ = ["Job", "LocalJob", "ClientQuery", "Checkpoint", "JobStarted", "IterationReport", "ValidationReport",
           "Queued", "PlanReport"]


@dataclass
class Queued:
    position: int  # 1-based while waiting; 0 when the job starts


@dataclass
class ClientQuery:
    term: int
    name: str
    domain: str
    x: np.ndarray
    iteration: int
    working: torch.dtype = torch.float32  # what the answer will be used in (its safe range)

    @property
    def who(self) -> str:
        return f"client loss {self.name!r}"


@dataclass
class IterationReport:
    iteration: int
    loss: float
    loss_terms: list[float]
    grad_norm: float
    images: list[bytes]
    sample_losses: list[float] = field(default_factory=list)
    x_T: Any = None            # OptimizeLatent: the iterate this iteration evaluated
    stopped: list[bool] = field(default_factory=list)
    lr: float = 0.0


@dataclass
class ValidationReport:
    iteration: int
    loss: float
    loss_terms: list[float]
    agreement: float | None
    images: list[bytes]
    best: bool


@dataclass
class Checkpoint:
    info: Any  # ArtifactInfo


@dataclass
class JobStarted:
    """A fine-tune's id, sent first: what its client resumes it by if the stream is lost."""

    id: str
    replica: str
    iteration: int


@dataclass
class PlanReport:
    """A gradient pass's memory plan (``core.MemoryPlan``) and the iteration it was made at."""

    plan: Any
    iteration: int
    decoder: Any = None  # the VAE decoder's plan (models/_decoding.DecodePlan), when it has one


class Job:
    """Base: events go nowhere, no client to ask, never cancelled.

    ``deadline`` (time.monotonic) ends the job with DEADLINE_EXCEEDED at its next check;
    ``checkpoint_now`` asks a fine-tune to write a checkpoint at its next iteration (shutdown);
    ``caller`` is who the engine shares the device fairly between (a token, a peer address).
    """

    def __init__(self, deadline: float | None = None, caller: str = "local"):
        self.caller = caller
        self.cancelled = threading.Event()
        self.checkpoint_now = threading.Event()
        self.deadline = deadline
        self.nfe = 0
        self._plan = None  # the last memory plan reported
        self.decoder_plan = None  # the request's decoder plan (Objective.plan_decoder)

    def report_plan(self, plan, iteration: int = 0) -> None:
        """Emit a gradient pass's memory plan: the first, and any whose decisions differ from the
        last one's — not its measured ``graph_bytes`` nor its ``budget_bytes`` (half the free
        memory by default: it moves with everything else the machine runs)."""
        decoder = self.decoder_plan
        decisions = (dataclasses.replace(plan, graph_bytes=0, budget_bytes=0),
                     decoder and dataclasses.replace(decoder, graph_bytes=0))
        if decisions != self._plan:
            self._plan = decisions
            self.emit(PlanReport(plan, iteration, decoder))

    def count_nfe(self, phase: str, n: int) -> None:
        """Network evaluations done in ``phase`` (forward / backward), for metrics."""

    def emit(self, event) -> None:
        pass

    def ask(self, query: ClientQuery) -> LossAnswer:
        """The client's answer for a loss term at query.x, checked (``check_reply``) where it
        entered: a task uses it as it is."""
        raise FailedPrecondition(f"loss {query.name!r} is a client-side loss, but this call has "
                                 "no client to compute it")

    def check(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled("the request was cancelled")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceeded("the request ran past its deadline")


class LocalJob(Job):
    """For in-process use: events to a list, client losses answered by Python callables."""

    def __init__(self, client_losses: dict[str, Callable] | None = None, caller: str = "local"):
        super().__init__(caller=caller)
        self.events: list = []
        self.client_losses = client_losses or {}

    def emit(self, event) -> None:
        self.events.append(event)

    def ask(self, query: ClientQuery) -> LossAnswer:
        """``fn(x) → (value, grad)`` or ``(value, grad, per-sample values)``, checked here."""
        fn = self.client_losses.get(query.name)
        if fn is None:
            return super().ask(query)
        value, grad, *values = fn(query.x)
        return check_reply(value, grad, query.x.shape, query.who, query.working,
                           values[0] if values else None)
