"""What a running task may do besides computing: report events, ask the client, stop early.

The service implements ``Job`` over a gRPC stream; in-process callers (tests, examples) can use
``LocalJob``. Tasks call ``check()`` between solver steps, so a cancelled request stops within one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import Cancelled, FailedPrecondition

__all__ = ["Job", "LocalJob", "ClientQuery", "Checkpoint", "IterationReport"]


@dataclass
class ClientQuery:
    term: int
    name: str
    domain: str
    x: np.ndarray
    iteration: int


@dataclass
class IterationReport:
    iteration: int
    loss: float
    loss_terms: list[float]
    grad_norm: float
    images: list[bytes]


@dataclass
class Checkpoint:
    info: Any  # ArtifactInfo


class Job:
    """Base: events go nowhere, no client to ask, never cancelled."""

    def __init__(self):
        self.cancelled = threading.Event()
        self.nfe = 0

    def emit(self, event) -> None:
        pass

    def ask(self, query: ClientQuery) -> tuple[float, np.ndarray]:
        raise FailedPrecondition(f"loss {query.name!r} is a client-side loss, but this call has "
                                 "no client to compute it")

    def check(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled("the request was cancelled")


class LocalJob(Job):
    """For in-process use: events to a list, client losses answered by Python callables."""

    def __init__(self, client_losses: dict[str, Callable] | None = None):
        super().__init__()
        self.events: list = []
        self.client_losses = client_losses or {}

    def emit(self, event) -> None:
        self.events.append(event)

    def ask(self, query: ClientQuery) -> tuple[float, np.ndarray]:
        fn = self.client_losses.get(query.name)
        if fn is None:
            return super().ask(query)
        return fn(query.x)
