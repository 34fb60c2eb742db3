"""Bounded GPU work: at most ``slots`` jobs run at once, the rest wait in one FIFO queue of at
most ``max_queue`` (full → RESOURCE_EXHAUSTED, as TGI answers). A waiting job learns its
position as it moves up, and leaves the queue when cancelled or past its deadline."""

from __future__ import annotations

import threading
from collections import deque
from contextlib import contextmanager
from typing import Callable

from ..errors import ResourceExhausted, Unavailable

__all__ = ["AdmissionQueue"]


class AdmissionQueue:
    def __init__(self, slots: int = 1, max_queue: int = 16):
        if slots < 1 or max_queue < 0:
            raise ValueError("slots must be >= 1 and max_queue >= 0")
        self.slots, self.max_queue = slots, max_queue
        self._running = 0
        self._waiting: deque = deque()
        self._cond = threading.Condition()
        self._closed = False

    @property
    def running(self) -> int:
        return self._running

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        """Refuse new work (graceful shutdown); jobs already admitted go on."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @contextmanager
    def slot(self, check: Callable[[], None], on_position: Callable[[int], None] | None = None):
        """Hold a slot for the body. ``check()`` raises to abandon the wait (cancel, deadline);
        ``on_position(k)`` is told the 1-based queue position whenever it changes, then 0."""
        self._acquire(check, on_position)
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    def _acquire(self, check, on_position) -> None:
        with self._cond:
            if self._closed:
                raise Unavailable("the server is shutting down; retry on another replica")
            if self._running < self.slots and not self._waiting:
                self._running += 1
                return
            if len(self._waiting) >= self.max_queue:
                raise ResourceExhausted(f"the queue is full ({self.max_queue} waiting, "
                                        f"{self._running} running); retry later")
            ticket = object()
            self._waiting.append(ticket)
            told = None
            try:
                while True:
                    position = self._waiting.index(ticket)
                    if position == 0 and self._running < self.slots:
                        self._waiting.popleft()
                        self._running += 1
                        self._cond.notify_all()
                        break
                    if on_position is not None and position + 1 != told:
                        told = position + 1
                        on_position(told)
                    self._cond.wait(timeout=0.1)
                    check()
            except BaseException:
                if ticket in self._waiting:
                    self._waiting.remove(ticket)
                    self._cond.notify_all()
                raise
        if on_position is not None and told is not None:
            on_position(0)
