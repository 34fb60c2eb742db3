"""Fair admission: whose jobs may hold a state in memory and run, and who waits.

Jobs wait per caller (a tenant, or a peer when auth is off), first come first served within one
caller. When room frees, the waiter whose caller runs the fewest jobs per unit of weight goes
first (ties: the earliest arrival) — weighted fair queuing of jobs, not one global FIFO:

- ``slots`` jobs run. A caller below its guaranteed share (``slots`` × its weight / the weights
  of every caller with work here, at least 1) is admitted beyond that, up to ``slots + burst``:
  a newcomer never waits for another tenant's jobs to end.
- A job parked on its client's reply gives its slot back (``Admitted.parked``) within a
  per-caller and a global allowance of parked jobs; past those it keeps its slot while it waits.
  On the reply it takes a slot again, before its caller's new jobs.
- At most ``max_queue`` jobs wait, at most ``tenant_max_queue`` of one caller. When the queue is
  full, an arrival whose caller waits with fewer jobs than the longest queue takes the place of
  that caller's newest waiter (longest-queue drop, as fair queuing routers do), so one caller
  filling the queue cannot refuse another's call; alone, a caller may use all of it.

A refusal is RESOURCE_EXHAUSTED naming the limit (the caller's own or the server's) with a
retry-after hint: the typical job's duration times the waits ahead of the caller.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Mapping

from ..errors import ResourceExhausted, Unavailable

__all__ = ["AdmissionQueue", "Admitted", "CallerLoad"]


@dataclass(frozen=True)
class CallerLoad:
    """One caller's jobs at this moment (for metrics and status)."""

    queued: int
    running: int
    parked: int


class _Waiter:
    __slots__ = ("caller", "seq", "resume", "state", "error")

    def __init__(self, caller: str, seq: int, resume: bool):
        self.caller, self.seq, self.resume = caller, seq, resume
        self.state, self.error = "waiting", None  # waiting → admitted | dropped


class Admitted:
    """A held slot; ``parked()`` lends it back while the job waits for its client."""

    def __init__(self, queue: "AdmissionQueue", caller: str, check: Callable[[], None]):
        self.queue, self.caller, self.check = queue, caller, check
        self.holding = True
        self.lent_s = 0.0  # time the slot was lent (the job parked without it)

    @contextmanager
    def parked(self):
        released = self.queue._park(self)
        started = time.monotonic()
        try:
            yield
        except BaseException:
            if released:  # the job ends (cancelled, timed out): it takes no slot to end
                self.queue._unpark(self.caller)
            raise
        if released:
            self.lent_s += time.monotonic() - started
            self.queue._resume(self)


class AdmissionQueue:
    def __init__(self, slots: int = 1, max_queue: int = 16, *, tenant_max_queue: int | None = None,
                 max_parked: int | None = None, tenant_max_parked: int | None = None,
                 burst: int | None = None, weights: Mapping[str, float] | None = None):
        if slots < 1 or max_queue < 0:
            raise ValueError("slots must be >= 1 and max_queue >= 0")
        self.slots, self.max_queue = slots, max_queue
        self.tenant_max_queue = max_queue if tenant_max_queue is None else tenant_max_queue
        self.max_parked = 2 * slots if max_parked is None else max_parked
        self.tenant_max_parked = (max(1, self.max_parked // 2) if tenant_max_parked is None
                                  else tenant_max_parked)
        self.burst = max(1, slots // 2) if burst is None else burst
        self.weights = dict(weights or {})
        if any(w <= 0 or not math.isfinite(w) for w in self.weights.values()):
            raise ValueError("tenant weights must be positive and finite")
        self._cond = threading.Condition()
        self._running: Counter = Counter()
        self._parked: Counter = Counter()
        self._waiting: dict[str, deque[_Waiter]] = {}
        self._queued = 0  # waiters that are not resuming (resumers are admitted already)
        self._seq = itertools.count()
        self._vtime: dict[str, float] = {}  # caller → jobs admitted / weight (fair order)
        self._now_v = 0.0
        self._typical_s = 1.0  # a job's slot time, smoothed: the retry-after hint's unit
        self._closed = False

    # -- what operators and metrics read ---------------------------------------------------------
    @property
    def running(self) -> int:
        with self._cond:  # re-entrant: also read under the lock (scrapes read it from outside)
            return sum(self._running.values())

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def parked_jobs(self) -> int:
        with self._cond:
            return sum(self._parked.values())

    def load(self) -> dict[str, CallerLoad]:
        """Every caller with a job here: queued, running, parked."""
        with self._cond:
            callers = set(self._running) | set(self._parked) | set(self._waiting)
            return {c: CallerLoad(sum(not w.resume for w in self._waiting.get(c, ())),
                                  self._running[c], self._parked[c]) for c in callers}

    @property
    def typical_job_s(self) -> float:
        """How long a job holds its slot, smoothed: the unit of retry-after hints."""
        return round(self._typical_s, 1)

    def weight(self, caller: str) -> float:
        return self.weights.get(caller, 1.0)

    def close(self) -> None:
        """Refuse new work (graceful shutdown); jobs already admitted go on."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- holding a slot ----------------------------------------------------------------------------
    @contextmanager
    def slot(self, check: Callable[[], None], on_position: Callable[[int], None] | None = None,
             caller: str = "local"):
        """Hold a slot for the body (yields an ``Admitted``). ``check()`` raises to abandon a
        wait (cancel, deadline); ``on_position(k)`` hears the estimated 1-based position as it
        changes, then 0."""
        with self._cond:
            if self._closed:
                raise Unavailable("the server is shutting down; retry on another replica")
            waiter = self._enqueue(caller, resume=False)
        if waiter is not None:
            self._wait(waiter, check, on_position)
        held, started = Admitted(self, caller, check), time.monotonic()
        try:
            yield held
        finally:
            with self._cond:
                if held.holding:
                    self._release(caller)
                spent = time.monotonic() - started - held.lent_s  # the slot's time, not the client's
                self._typical_s += 0.2 * (spent - self._typical_s)

    def _enqueue(self, caller: str, resume: bool) -> _Waiter | None:
        """Under the lock: None when admitted at once, else the waiter (placed or refused)."""
        waiter = _Waiter(caller, next(self._seq), resume)
        # after every change no waiter is admissible (``_admit_ready``): one that is, goes now
        if (resume or caller not in self._waiting) and self._admissible(caller):
            self._running[caller] += 1
            if not resume:
                self._account(caller)
            return None
        queue = self._waiting.setdefault(caller, deque())
        if resume:
            queue.appendleft(waiter)  # admitted before: ahead of its caller's new jobs
        else:
            self._refuse_or_make_room(caller, queue)
            queue.append(waiter)
            self._queued += 1
        self._admit_ready()
        return waiter

    def _refuse_or_make_room(self, caller: str, queue: deque) -> None:
        mine = sum(not w.resume for w in queue)
        if mine >= self.tenant_max_queue and self.tenant_max_queue < self.max_queue:
            if not queue:
                del self._waiting[caller]
            hint = self._retry_after(caller, mine)
            raise ResourceExhausted(
                f"your queue is full: {mine} of your jobs wait (the per-tenant limit is "
                f"{self.tenant_max_queue}); retry in {hint:.1f} s", retry_after_s=hint)
        if self._queued < self.max_queue:
            return
        longest, count = max(((c, sum(not w.resume for w in q)) for c, q in self._waiting.items()),
                             key=lambda item: item[1])
        if count <= mine + 1:
            if not queue:
                del self._waiting[caller]
            hint = self._retry_after(caller, mine)
            raise ResourceExhausted(
                f"the server's queue is full ({self._queued} waiting, {self.running} running; "
                f"the global limit is {self.max_queue}); retry in {hint:.1f} s", retry_after_s=hint)
        victims = self._waiting[longest]
        victim = next(w for w in reversed(victims) if not w.resume)
        self._drop(victim, count)

    def _drop(self, victim: _Waiter, count: int) -> None:
        self._remove(victim)
        hint = self._retry_after(victim.caller, count - 1)
        victim.state = "dropped"
        victim.error = ResourceExhausted(
            f"the server's queue is full and your {count} waiting jobs were its longest share: "
            f"this one gave its place to another tenant's call; retry in {hint:.1f} s",
            retry_after_s=hint)
        self._cond.notify_all()

    def _retry_after(self, caller: str, ahead: int) -> float:
        share = max(1, self._guaranteed(caller))
        return min(300.0, max(0.1, self._typical_s * math.ceil((ahead + 1) / share)))

    def _wait(self, waiter: _Waiter, check, on_position) -> None:
        told = None
        try:
            with self._cond:
                while waiter.state == "waiting":
                    position = self._position(waiter)
                    if on_position is not None and position != told:
                        told = position
                        on_position(position)
                    self._cond.wait(timeout=0.1)
                    if waiter.state == "waiting":
                        check()
                if waiter.state == "dropped":
                    raise waiter.error
        except BaseException:
            with self._cond:
                if waiter.state == "waiting":
                    self._remove(waiter)
                elif waiter.state == "admitted":  # admitted as the wait was abandoned
                    self._release(waiter.caller)
                self._cond.notify_all()
            raise
        if on_position is not None and told is not None:
            on_position(0)

    # -- the fair order ----------------------------------------------------------------------------
    def _guaranteed(self, caller: str) -> int:
        """``caller``'s share of the slots among the callers with work here (at least 1)."""
        present = set(self._running) | set(self._waiting) | {caller}
        total = sum(self.weight(c) for c in present)
        return max(1, math.floor(self.slots * self.weight(caller) / total))

    def _admissible(self, caller: str) -> bool:
        running = self.running
        if running < self.slots:
            return True
        return running < self.slots + self.burst and self._running[caller] < self._guaranteed(caller)

    def _order(self) -> list[_Waiter]:
        """Each caller's first waiter, the least served caller first: fewest running jobs per
        unit of weight, then fewest admitted so far (a virtual time, as in start-time fair
        queuing: a caller back after a pause starts from the current one), then arrival."""
        heads = [q[0] for q in self._waiting.values() if q]
        return sorted(heads, key=lambda w: (self._running[w.caller] / self.weight(w.caller),
                                            max(self._vtime.get(w.caller, 0.0), self._now_v), w.seq))

    def _account(self, caller: str) -> None:
        """A new job of ``caller`` admitted: its virtual time moves on by 1 / weight."""
        start = max(self._vtime.get(caller, 0.0), self._now_v)
        self._now_v = start
        self._vtime[caller] = start + 1.0 / self.weight(caller)
        if len(self._vtime) > 2 * (len(self._running) + len(self._waiting)) + 64:
            for c in [c for c, v in self._vtime.items() if v <= self._now_v]:
                del self._vtime[c]

    def _admit_ready(self) -> None:
        admitted = True
        while admitted:
            admitted = False
            for head in self._order():
                if self._admissible(head.caller):
                    self._remove(head)
                    head.state = "admitted"
                    self._running[head.caller] += 1
                    if not head.resume:
                        self._account(head.caller)
                    admitted = True
                    break
        self._cond.notify_all()

    def _position(self, waiter: _Waiter) -> int:
        """An estimate: the caller's rank in the fair order plus one turn per job ahead of it."""
        queue = self._waiting[waiter.caller]
        rank = [w.caller for w in self._order()].index(waiter.caller)
        return 1 + rank + queue.index(waiter) * len(self._waiting)

    def _remove(self, waiter: _Waiter) -> None:
        queue = self._waiting[waiter.caller]
        queue.remove(waiter)
        if not waiter.resume:
            self._queued -= 1
        if not queue:
            del self._waiting[waiter.caller]

    def _release(self, caller: str) -> None:
        self._running[caller] -= 1
        if self._running[caller] <= 0:
            del self._running[caller]
        self._admit_ready()

    # -- parking -----------------------------------------------------------------------------------
    def _park(self, held: Admitted) -> bool:
        with self._cond:
            caller = held.caller
            if not held.holding or self._parked[caller] >= self.tenant_max_parked \
                    or self.parked_jobs >= self.max_parked:
                return False  # past the allowance: it keeps its slot while it waits
            held.holding = False
            self._parked[caller] += 1
            self._release(caller)
            return True

    def _unpark(self, caller: str) -> None:
        with self._cond:
            self._parked[caller] -= 1
            if self._parked[caller] <= 0:
                del self._parked[caller]
            self._cond.notify_all()

    def _resume(self, held: Admitted) -> None:
        self._unpark(held.caller)
        with self._cond:
            waiter = self._enqueue(held.caller, resume=True)
        if waiter is not None:
            self._wait(waiter, held.check, None)
        held.holding = True
