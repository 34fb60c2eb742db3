"""``NetworkEngine``: one thread owns the device and runs network calls, batched across jobs.

Jobs submit work items and wait. The device is shared between callers (tenants) by start-time
fair queuing on what their calls cost: each caller has a virtual time, advanced after every
call by its share of the call's measured seconds (its rows / the call's rows) over its weight;
the next batch starts with the oldest item of the caller with the least virtual time, then adds
compatible pending items (same network, dtype, per-sample shapes, kind) one per caller per
round, up to ``max_batch`` samples; it concatenates them, runs one call and splits the result.
While another caller has work, a head larger than ``chunk_rows`` runs in chunks at row
boundaries (every served network is per-sample, so the joined result is the unsplit call's).

It waits at most ``window_ms`` for more work after the oldest pending item, and not at all once
every runnable job has submitted; after a call it waits up to ``window_ms`` for a job whose
caller is owed the device (least virtual time) to send its next call — a sequential caller is
not made to wait behind a whole call of a busier one (anticipation). A job that waits for its
client is *parked*: it holds no device turn and nobody waits for it. ``window_ms = 0`` runs
every call alone (batching off).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from ..core import SharedRows, checkpointed_blocks
from ..errors import Cancelled
from ._network import EngineNetwork
from ._share import FairShare
from ._work import FORWARD, LEASE, SOLO, VJP, WorkItem

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
    chunks: int = 0          # calls that ran part of a larger item while others waited
    work: Counter = field(default_factory=Counter)   # device seconds by caller
    recent: deque = field(default_factory=lambda: deque(maxlen=256))  # (kind, [caller per item])


class NetworkEngine:
    def __init__(self, *, max_batch: int = 64, window_ms: float = 5.0,
                 observer: Callable[[str, str, int], None] | None = None,
                 weights: Mapping[str, float] | None = None, chunk_rows: int | None = None,
                 share_from: int = 2):
        if max_batch < 1 or window_ms < 0 or (chunk_rows is not None and chunk_rows < 1):
            raise ValueError("max_batch and chunk_rows must be >= 1 and window_ms >= 0")
        self.max_batch, self.window_s = max_batch, window_ms / 1000.0
        self.chunk_rows = chunk_rows or max_batch
        self.share_from = max(2, share_from)
        self.observer = observer
        self.stats = EngineStats()
        self._share = FairShare(weights, work=self.stats.work)
        self._cond = threading.Condition()
        self._queues: dict[str, deque[WorkItem]] = {}  # pending items by caller, oldest first
        self._last_done: dict = {}            # job → when its last call ended (anticipation)
        self._last_key: dict = {}             # job → its last call's batch key (who to wait for)
        self._gradient_jobs: set = set()      # jobs that asked ``shares_calls`` (make VJP calls)
        self._trainers: set = set()           # jobs training weights (solo calls only)
        self._row_trainers: set = set()       # jobs training an adapter of a bank (shared VJPs)
        self._registered: Counter = Counter()  # job → sessions open (normally 1)
        self._exclusive = None                 # the job holding the device (``exclusive``)
        self._parked: Counter = Counter()
        self._pending: Counter = Counter()     # job → items waiting
        self._npending = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- what jobs do ----------------------------------------------------------------------------
    def network(self, module, job, model: str = "") -> EngineNetwork:
        """``module`` as ``eps_fn`` for ``job``: its calls go through this engine."""
        network = EngineNetwork(self, module, job, model)
        if network.trainable:
            with self._cond:
                if job in self._registered:  # solo calls only, or VJPs shared among trainers
                    (self._row_trainers if network.splits_weights else self._trainers).add(job)
        return network

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
                    if counter is self._registered:
                        self._last_done.pop(job, None)
                        self._last_key.pop(job, None)
                        self._gradient_jobs.discard(job)
                        self._trainers.discard(job)
                        self._row_trainers.discard(job)
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

    def gradient_jobs(self, job=None) -> int:
        """Runnable jobs that may make VJP calls now: those that asked (gradient jobs: ``job`` is
        one from now on) and those that have made no call yet; a job parked on its client makes
        none, a sampling job no VJP, a job training weights only solo calls. Jobs training bank
        adapters count for each other only: sixteen fine-tunes batch their VJPs, but do not turn
        another tenant's lone gradient into a recomputing one whose rows ride in their batches
        (measured on a CPU: 4.4× that tenant's latency, results/hostile_tenant.md)."""
        with self._cond:
            if job is not None and job in self._registered:
                self._gradient_jobs.add(job)
            skip = self._trainers if job in self._row_trainers else self._trainers | self._row_trainers
            return sum(1 for j in self._registered if j not in self._parked and j not in skip
                       and (j in self._gradient_jobs or j not in self._last_key))

    def shares_calls(self, job=None) -> bool:
        """Whether ``job``'s gradient calls would now batch with enough others' to pay for
        recomputing rather than keeping solo graphs (``auto``): batching is on and at least
        ``share_from`` gradient jobs run. On an accelerator 2; on a CPU more, since kept graphs'
        backward passes run in the jobs' own threads beside the engine's calls, on the other
        cores — a parallelism a batched recompute gives up (docs/design.md §5)."""
        return self.window_s > 0 and self.max_batch > 1 and self.gradient_jobs(job) >= self.share_from

    @property
    def waiting_client(self) -> int:
        return len(self._parked)

    @contextmanager
    def exclusive(self, job):
        """The device for work ``job`` does in its own thread — the backward pass through the
        graphs a weight-training job keeps — as one turn of the fair share: the engine runs
        nothing else meanwhile, the job's own calls in it run inline, and its time is charged to
        the job's caller like a call's (else N such passes would run beside every call, unshared
        and uncounted). With no other caller's work here it takes no turn: a single tenant's
        passes run side by side as before."""
        with self._cond:
            alone = not self._others_active(job.caller)
        if alone:
            yield
            return
        release, granted = threading.Event(), threading.Event()

        def hold():
            granted.set()
            while not release.wait(0.05) and not self._closed:
                pass

        item = WorkItem(LEASE, None, job, job.caller, "", 1, closure=hold)
        self._enqueue(item)
        try:
            while not granted.wait(0.05) and not item.done.is_set():
                job.check()  # cancelled while waiting: withdrawn below
            if item.error is not None:
                raise item.error
            with self._cond:
                self._exclusive = job
            yield
        finally:
            with self._cond:
                if self._exclusive is job:
                    self._exclusive = None
            release.set()
            self._withdraw(item)
            if item.state != "withdrawn":
                item.done.wait()
            item.release()

    def submit(self, item: WorkItem):
        """Queue ``item`` and wait for its result; a cancelled job withdraws its pending item."""
        if self._exclusive is item.job and threading.current_thread() is not self._thread:
            return item.closure() if item.kind == SOLO else _run([item])[0]  # its own turn
        self._enqueue(item)
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

    def _enqueue(self, item: WorkItem) -> None:
        with self._cond:
            if self._closed:
                raise Cancelled("the server is shutting down")
            queue = self._queues.get(item.caller)
            if queue is None:  # back with work: no credit for the time it had none (SFQ)
                queue = self._queues[item.caller] = deque()
                self._share.back(item.caller)
            queue.append(item)
            if item.job in self._registered:
                self._last_key[item.job] = item.key
            self._pending[item.job] += 1
            self._npending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="adjointdpm-engine", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the engine thread after the call it is running (a process must not exit while
        a torch op runs on another thread: that aborts it); pending items end with CANCELLED."""
        with self._cond:
            self._closed = True
            items = [it for q in self._queues.values() for it in q]
            for item in items:
                item.state = "closed"  # not pending any more: a withdrawal leaves it alone
            self._queues.clear()
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
        if not queue:  # a caller with nothing pending leaves (its virtual time stays a while)
            del self._queues[item.caller]
        self._pending[item.job] -= 1
        if self._pending[item.job] <= 0:
            del self._pending[item.job]
        self._npending -= 1

    def _ready(self) -> bool:
        """A full batch is waiting, or every runnable job that could join the next batch has
        submitted: a job whose last call was of another kind (its backward while the next batch
        is a forward one, another model) is not waited for."""
        if sum(it.rows for q in self._queues.values() for it in q) >= self.max_batch:
            return True
        head = self._queues[self._order()[0]][0].key
        if head is None:  # a call that runs alone waits for nobody
            return True
        return all(job in self._pending or job in self._parked
                   or self._last_key.get(job, head) != head for job in self._registered)

    @property
    def weights(self) -> dict[str, float]:
        return self._share.weights

    def weight(self, caller: str) -> float:
        return self._share.weight(caller)

    def work_by_caller(self) -> dict[str, float]:
        """Device seconds each caller's rows took (at most MAX_CALLERS_COUNTED, then "other")."""
        with self._cond:
            return dict(self.stats.work)

    def _order(self) -> list[str]:
        """Callers with pending work, the one owed the device most first (``FairShare``)."""
        return self._share.order(self._queues)

    def _others_active(self, caller: str) -> bool:
        """Whether a caller other than ``caller`` has work pending or a runnable job."""
        return len(self._queues) > 1 or any(
            job.caller != caller for job in self._registered if job not in self._parked)

    def _select(self) -> list[WorkItem]:
        """The next batch: the head of the caller owed the device most (in chunks while others
        have work), then compatible items, one per caller per round, up to ``max_batch``."""
        callers = self._order()
        first = callers[0]
        self._share.serve(first)
        head = self._queues[first][0]
        if head.key is not None and head.rows > self.chunk_rows and self._others_active(first):
            head = head.split(self.chunk_rows)  # the rest stays first in its caller's queue
            self.stats.chunks += 1
            head.state = "running"
            return [head]
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
                    self._anticipate()
                if not self._npending:  # everything was withdrawn meanwhile
                    continue
                batch = self._select()
            self._execute(batch)
            # An idle engine must not hold the last batch: a solo item's result carries its
            # job's whole graph (backprop), and the item its job (docs/design.md §6).
            del batch

    def _anticipate(self) -> None:
        """Under the lock: wait (≤ window after its last call ended) for a runnable job with no
        call pending whose caller is not the next to be served but is owed the device as much
        (its jobs' calls would otherwise wait behind the next caller's whole call)."""
        while self._npending and not self._closed:
            first = self._order()[0]
            least = self._share.vtime(first)
            until = max((done for job, done in self._last_done.items()
                         if job.caller != first and job in self._registered
                         and job not in self._parked and job not in self._pending
                         and self._share.vtime(job.caller) <= least), default=None)
            remaining = None if until is None else until + self.window_s - time.monotonic()
            if remaining is None or remaining <= 0:
                return
            self._cond.wait(remaining)

    def _execute(self, batch: list[WorkItem]) -> None:
        started = time.monotonic()
        try:
            outputs = _run(batch)
        except BaseException as err:  # noqa: BLE001 — delivered to the jobs, the engine goes on
            if len(batch) == 1:
                self._record(batch, time.monotonic() - started)
                self._finish(batch[0], error=err)
                return
            for item in batch:  # find whose input failed: nobody else's job is hurt
                self._execute([item])
            return
        self._record(batch, time.monotonic() - started)
        for item, out in zip(batch, outputs):
            self._finish(item, result=out)

    def _finish(self, item: WorkItem, result=None, error=None) -> None:
        if item.parent is not None and error is not None:
            with self._cond:
                if item.parent.state == "pending":
                    self._take(item.parent)  # a chunk failed: the rest of its item does not run
        item.finish(result=result, error=error)

    def _record(self, batch: list[WorkItem], seconds: float) -> None:
        kind, rows = batch[0].kind, sum(it.rows for it in batch)
        with self._cond:
            self._share.charge(batch, seconds, self._queues)
            done = time.monotonic()
            for item in batch:  # when each job's call ended (anticipation)
                self._last_done[(item.parent or item).job] = done
            s = self.stats
            s.calls[kind] += 1
            s.rows[kind] += rows
            s.items[kind] += len(batch)
            s.max_rows = max(s.max_rows, rows)
            s.recent.append((kind, [item.caller for item in batch]))
        if self.observer is not None and kind != LEASE:  # a lease is no network call
            try:
                self.observer(batch[0].model, kind, rows)
            except Exception:  # noqa: BLE001 — metrics must never stop the engine
                log.exception("the engine's observer failed")


def _cat(values):
    if len(values) == 1 or values[0] is None:
        return values[0]
    return torch.cat(values)


def _network(batch: list[WorkItem]):
    """The call for ``batch``: the network itself, or its shared base with each item's rows
    through the item's own adapter (``SharedRows``)."""
    head = batch[0]
    if isinstance(head.module, SharedRows):
        parts = [(it.module, it.rows) for it in batch]
        return lambda x, t, cond: head.module.run_rows(x, t, cond, parts)
    return head.module


def _run(batch: list[WorkItem]) -> list:
    """One network call for the whole batch, split back per item."""
    head = batch[0]
    if head.kind in (SOLO, LEASE):
        return [head.closure()]
    rows = [it.rows for it in batch]
    x, t = _cat([it.x for it in batch]), _cat([it.t for it in batch])
    cond = _cat([it.cond for it in batch])
    network = _network(batch)
    if head.kind == FORWARD:
        with torch.no_grad():
            out = network(x, t, cond)
        _check_rows(out, sum(rows))
        return list(out.split(rows)) if len(batch) > 1 else [out]
    assert head.kind == VJP
    # On CUDA, autograd runs a backward on its per-device worker thread, where the job that
    # submitted this call may be blocked (its own backward): run this one on this thread.
    weights = list({id(w): w for it in batch for w in it.weights}.values())
    with torch.enable_grad(), torch.autograd.set_multithreading_enabled(False), \
            checkpointed_blocks(head.blocks):
        x = x.detach().requires_grad_()
        if head.cond_grad:
            cond = cond.detach().requires_grad_()
        out = network(x, t, cond)
        _check_rows(out, sum(rows))
        inputs = [x, cond] if head.cond_grad else [x]
        grads = torch.autograd.grad(out, inputs + weights, _cat([it.cotangent for it in batch]),
                                    allow_unused=True)
    out = out.detach()
    gx = torch.zeros_like(x) if grads[0] is None else grads[0]
    gc = None
    if head.cond_grad:
        gc = torch.zeros_like(cond) if grads[1] is None else grads[1]
    by_weight = {id(w): torch.zeros_like(w) if g is None else g
                 for w, g in zip(weights, grads[len(inputs):])}
    gw = [tuple(by_weight[id(w)] for w in it.weights) for it in batch]
    if len(batch) == 1:
        return [(out, gx, gc, gw[0])]
    gcs = gc.split(rows) if gc is not None else [None] * len(rows)
    return list(zip(out.split(rows), gx.split(rows), gcs, gw))


def _check_rows(out, rows: int) -> None:
    if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != rows:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the network returned {got} for a batch of {rows}")
