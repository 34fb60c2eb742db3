"""``NetworkEngine``: one thread owns the device and runs network calls, batched across jobs.

Jobs submit work items and wait. The engine thread takes the oldest item of the next caller in
round-robin order, adds every compatible pending item (same network, dtype, per-sample shapes,
kind) one per caller per round up to ``max_batch`` samples, concatenates, runs one call and
splits the result. It waits at most ``window_ms`` for more work, and not at all once every
runnable job has submitted. A job that waits for its client is *parked*: it holds no device
turn and nobody waits for it. ``window_ms = 0`` runs every call alone (batching off).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import Cancelled
from ._network import EngineNetwork
from ._work import FORWARD, SOLO, VJP, WorkItem

__all__ = ["NetworkEngine", "EngineStats"]

log = logging.getLogger("adjointdpm.engine")


@dataclass
class EngineStats:
    """Counts for tests and benchmarks (Prometheus gets the same through ``observer``)."""

    calls: Counter = field(default_factory=Counter)  # network calls by kind
    rows: Counter = field(default_factory=Counter)   # samples through the network by kind
    items: Counter = field(default_factory=Counter)  # job calls served, by kind
    max_rows: int = 0
    window_expired: int = 0  # batches that waited the whole window for jobs that never came
    recent: deque = field(default_factory=lambda: deque(maxlen=256))  # (kind, [caller per item])


class NetworkEngine:
    def __init__(self, *, max_batch: int = 64, window_ms: float = 5.0,
                 observer: Callable[[str, str, int], None] | None = None):
        if max_batch < 1 or window_ms < 0:
            raise ValueError("max_batch must be >= 1 and window_ms >= 0")
        self.max_batch, self.window_s = max_batch, window_ms / 1000.0
        self.observer = observer
        self.stats = EngineStats()
        self._cond = threading.Condition()
        self._queues: dict[str, deque[WorkItem]] = {}
        self._rotation: deque[str] = deque()  # callers, the next to serve first
        self._registered: Counter = Counter()  # job → sessions open (normally 1)
        self._parked: Counter = Counter()
        self._pending: Counter = Counter()     # job → items waiting
        self._npending = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- what jobs do ----------------------------------------------------------------------------
    def network(self, module, job, model: str = "") -> EngineNetwork:
        """``module`` as ``eps_fn`` for ``job``: its calls go through this engine."""
        return EngineNetwork(self, module, job, model)

    @contextmanager
    def _held(self, counter: Counter, job):
        with self._cond:
            counter[job] += 1
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                counter[job] -= 1
                if counter[job] <= 0:
                    del counter[job]
                self._cond.notify_all()

    def session(self, job):
        """``job`` is active: while it runs, a batch may wait (≤ window) for its next call."""
        return self._held(self._registered, job)

    def parked(self, job):
        """``job`` waits for its client: nobody waits for it."""
        return self._held(self._parked, job)

    @property
    def active(self) -> int:
        return len(self._registered)

    def shares_calls(self) -> bool:
        """Whether a job's network calls would now batch with another job's: batching is on and
        more than one job is active (``auto`` then recomputes rather than keeping solo graphs)."""
        return self.window_s > 0 and self.max_batch > 1 and self.active > 1

    @property
    def waiting_client(self) -> int:
        return len(self._parked)

    def submit(self, item: WorkItem):
        """Queue ``item`` and wait for its result; a cancelled job withdraws its pending item."""
        with self._cond:
            if self._closed:
                raise Cancelled("the server is shutting down")
            queue = self._queues.get(item.caller)
            if queue is None:
                queue = self._queues[item.caller] = deque()
                self._rotation.append(item.caller)
            queue.append(item)
            self._pending[item.job] += 1
            self._npending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="adjointdpm-engine", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        try:
            while not item.done.wait(0.05):
                try:
                    item.job.check()
                except BaseException:
                    self._withdraw(item)
                    if item.state != "withdrawn":  # running: the job ends after its call does,
                        item.done.wait()           # so that what the call made goes with it
                    raise
            if item.error is not None:
                raise item.error
            return item.result
        finally:
            item.release()  # the engine may hold the item a moment longer, never its tensors

    def close(self, timeout: float = 30.0) -> None:
        """Stop the engine thread after the call it is running (a process must not exit while
        a torch op runs on another thread: that aborts it); pending items end with CANCELLED."""
        with self._cond:
            self._closed = True
            items = [it for q in self._queues.values() for it in q]
            for item in items:
                item.state = "closed"  # not pending any more: a withdrawal leaves it alone
            self._queues.clear()
            self._rotation.clear()
            self._pending.clear()
            self._npending = 0
            self._cond.notify_all()
        for it in items:
            it.finish(error=Cancelled("the server is shutting down"))
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # -- the engine thread -----------------------------------------------------------------------
    def _withdraw(self, item: WorkItem) -> None:
        with self._cond:
            if item.state == "pending":
                self._take(item)
                item.state = "withdrawn"
                self._cond.notify_all()

    def _take(self, item: WorkItem) -> None:
        queue = self._queues[item.caller]
        queue.remove(item)
        if not queue:  # a caller with nothing pending leaves the rotation (no growth per caller)
            del self._queues[item.caller]
            self._rotation.remove(item.caller)
        self._pending[item.job] -= 1
        if self._pending[item.job] <= 0:
            del self._pending[item.job]
        self._npending -= 1

    def _ready(self) -> bool:
        """Every runnable job has submitted, or a full batch is waiting."""
        if sum(it.rows for q in self._queues.values() for it in q) >= self.max_batch:
            return True
        return all(job in self._pending or job in self._parked for job in self._registered)

    def _select(self) -> list[WorkItem]:
        """The next batch: the head of the next caller in turn, then compatible items, one per
        caller per round, up to ``max_batch`` samples; that caller goes to the back."""
        callers = [c for c in self._rotation if self._queues.get(c)]
        first = callers[0]
        head = self._queues[first][0]
        batch, rows = [head], head.rows
        if head.key is not None and self.window_s > 0:
            taken = {id(head)}
            order = callers[1:] + callers[:1]  # the head was the first caller's turn
            grew = True
            while grew and rows < self.max_batch:
                grew = False
                for caller in order:
                    for item in self._queues[caller]:
                        if id(item) in taken or item.key != head.key:
                            continue
                        if rows + item.rows <= self.max_batch:
                            batch.append(item)
                            taken.add(id(item))
                            rows += item.rows
                            grew = True
                        break  # one item per caller per round
        self._rotation.remove(first)
        self._rotation.append(first)
        for item in batch:
            self._take(item)
            item.state = "running"
        return batch

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._npending:
                    self._cond.wait()
                if self._closed:
                    return
                if self.window_s > 0:
                    oldest = min(q[0].submitted for q in self._queues.values() if q)
                    deadline = oldest + self.window_s
                    while self._npending and not self._ready():
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            self.stats.window_expired += 1  # flushed for want of others
                            break
                        self._cond.wait(remaining)
                if not self._npending:  # everything was withdrawn meanwhile
                    continue
                batch = self._select()
            self._execute(batch)
            # An idle engine must not hold the last batch: a solo item's result carries its
            # job's whole graph (backprop), and the item its job (docs/design.md §6).
            del batch

    def _execute(self, batch: list[WorkItem]) -> None:
        try:
            outputs = _run(batch)
        except BaseException as err:  # noqa: BLE001 — delivered to the jobs, the engine goes on
            if len(batch) == 1:
                self._record(batch)
                batch[0].finish(error=err)
                return
            for item in batch:  # find whose input failed: nobody else's job is hurt
                self._execute([item])
            return
        self._record(batch)
        for item, out in zip(batch, outputs):
            item.finish(result=out)

    def _record(self, batch: list[WorkItem]) -> None:
        kind, rows = batch[0].kind, sum(it.rows for it in batch)
        with self._cond:
            s = self.stats
            s.calls[kind] += 1
            s.rows[kind] += rows
            s.items[kind] += len(batch)
            s.max_rows = max(s.max_rows, rows)
            s.recent.append((kind, [item.caller for item in batch]))
        if self.observer is not None:
            try:
                self.observer(batch[0].model, kind, rows)
            except Exception:  # noqa: BLE001 — metrics must never stop the engine
                log.exception("the engine's observer failed")


def _cat(values):
    if len(values) == 1 or values[0] is None:
        return values[0]
    return torch.cat(values)


def _run(batch: list[WorkItem]) -> list:
    """One network call for the whole batch, split back per item."""
    head = batch[0]
    if head.kind == SOLO:
        return [head.closure()]
    rows = [it.rows for it in batch]
    x, t = _cat([it.x for it in batch]), _cat([it.t for it in batch])
    cond = _cat([it.cond for it in batch])
    if head.kind == FORWARD:
        with torch.no_grad():
            out = head.module(x, t, cond)
        _check_rows(out, sum(rows))
        return list(out.split(rows)) if len(batch) > 1 else [out]
    assert head.kind == VJP
    # On CUDA, autograd runs a backward on its per-device worker thread, where the job that
    # submitted this call may be blocked (its own backward): run this one on this thread.
    with torch.enable_grad(), torch.autograd.set_multithreading_enabled(False):
        x = x.detach().requires_grad_()
        if head.cond_grad:
            cond = cond.detach().requires_grad_()
        out = head.module(x, t, cond)
        _check_rows(out, sum(rows))
        inputs = [x, cond] if head.cond_grad else [x]
        grads = torch.autograd.grad(out, inputs, _cat([it.cotangent for it in batch]), allow_unused=True)
    out = out.detach()
    gx = torch.zeros_like(x) if grads[0] is None else grads[0]
    gc = None
    if head.cond_grad:
        gc = torch.zeros_like(cond) if grads[1] is None else grads[1]
    if len(batch) == 1:
        return [(out, gx, gc)]
    parts = zip(out.split(rows), gx.split(rows), gc.split(rows) if gc is not None else [None] * len(rows))
    return list(parts)


def _check_rows(out, rows: int) -> None:
    if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != rows:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the network returned {got} for a batch of {rows}")
