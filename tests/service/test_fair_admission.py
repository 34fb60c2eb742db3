"""Fair admission (admission/queue.py), driven from threads as the service drives it: callers
are served in weighted fair order, a newcomer gets its guaranteed share at once, parked jobs
lend their slots, one caller filling the queue cannot refuse another, and every refusal names
its limit with a retry-after hint."""

from __future__ import annotations

import threading
import time

import pytest

from adjointdpm_server.admission import AdmissionQueue
from adjointdpm_server.errors import Cancelled, ResourceExhausted


def _never():
    return None


class Holder:
    """A job in its own thread: waits for a slot, records when it got one, holds it until told
    (``park`` parks it while held)."""

    def __init__(self, queue: AdmissionQueue, caller: str, order: list, name: str | None = None):
        self.queue, self.caller, self.order = queue, caller, order
        self.name = name or caller
        self.admitted, self.release, self.error = threading.Event(), threading.Event(), None
        self.park, self.unpark, self.parked, self.resumed = (threading.Event() for _ in range(4))
        self.cancel = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _check(self):
        if self.cancel.is_set():
            raise Cancelled("cancelled")

    def _run(self):
        try:
            with self.queue.slot(self._check, None, self.caller) as held:
                self.order.append(self.name)
                self.admitted.set()
                while not self.release.wait(0.01):
                    if self.park.is_set():
                        self.park.clear()
                        with held.parked():
                            self.parked.set()
                            self.unpark.wait(30)
                        self.resumed.set()
        except BaseException as err:  # noqa: BLE001
            self.error = err
            self.admitted.set()

    def done(self):
        self.release.set()
        self.thread.join(10)


def _settle():
    time.sleep(0.3)


def test_a_freed_slot_goes_to_the_least_served_caller_not_the_oldest_waiter():
    """A runs one job and queued three more before B's one: the next slot is B's."""
    queue, order = AdmissionQueue(slots=1, max_queue=8, burst=0), []
    first = Holder(queue, "A", order)
    assert first.admitted.wait(5)
    a_waiters = [Holder(queue, "A", order, f"A{k}") for k in range(3)]
    _settle()
    b = Holder(queue, "B", order)
    _settle()
    assert queue.queued == 4 and order == ["A"]
    first.done()
    assert b.admitted.wait(5) and order == ["A", "B"]
    b.done()
    for w in a_waiters:  # then A's own in arrival order
        assert w.admitted.wait(5)
        w.done()
    assert order == ["A", "B", "A0", "A1", "A2"]


def test_weights_share_the_slots():
    """Weight 3 against 1: A takes three freed slots for each of B's."""
    queue, order = AdmissionQueue(slots=4, max_queue=32, burst=0, weights={"A": 3.0}), []
    blockers = [Holder(queue, "C", order, "C") for _ in range(4)]
    assert all(b.admitted.wait(5) for b in blockers)
    a = [Holder(queue, "A", order, "A") for _ in range(6)]
    b = [Holder(queue, "B", order, "B") for _ in range(6)]
    _settle()
    for blocker in blockers:  # C leaves: its four slots go three to A, one to B
        blocker.release.set()
    deadline = time.monotonic() + 5
    while len(order) < 8 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sorted(order[4:]) == ["A", "A", "A", "B"]
    for h in a + b:
        h.done()


def test_a_newcomer_is_admitted_beyond_the_slots_up_to_its_share():
    """A holds every slot; B and C each start at once (their guaranteed share, within the
    burst allowance); D, past the burst, waits."""
    queue, order = AdmissionQueue(slots=4, max_queue=8, burst=2), []
    a = [Holder(queue, "A", order) for _ in range(4)]
    assert all(h.admitted.wait(5) for h in a)
    b, c = Holder(queue, "B", order), Holder(queue, "C", order)
    assert b.admitted.wait(5) and c.admitted.wait(5)
    d = Holder(queue, "D", order)
    _settle()
    assert not d.admitted.is_set() and queue.running == 6
    a[0].done()  # room in the burst again, and D is below its share: D starts
    assert d.admitted.wait(5)
    a_next = Holder(queue, "A", order, "A-next")  # A, over its share, waits for the slots
    _settle()
    assert not a_next.admitted.is_set()
    a[1].done()
    _settle()
    assert not a_next.admitted.is_set()  # 5 running, slots 4: A is past the slots still
    a[2].done()
    _settle()
    assert not a_next.admitted.is_set()  # 4 running: the slots are full
    a[3].done()
    assert a_next.admitted.wait(5)
    for h in [b, c, d, a_next]:
        h.done()


def test_a_parked_job_lends_its_slot_and_resumes_before_its_callers_new_jobs():
    queue, order = AdmissionQueue(slots=1, max_queue=8, burst=0), []
    a = Holder(queue, "A", order)
    assert a.admitted.wait(5)
    a_new = Holder(queue, "A", order, "A-new")
    b = Holder(queue, "B", order)
    _settle()
    a.park.set()
    assert a.parked.wait(5)
    assert b.admitted.wait(5)  # the parked job's slot went to B (least served)
    assert queue.parked_jobs == 1 and queue.load()["A"].parked == 1
    a.unpark.set()
    _settle()
    assert not a.resumed.is_set()  # B holds the one slot
    b.done()
    assert a.resumed.wait(5)  # the resuming job first, then A's new one
    assert not a_new.admitted.is_set()
    a.done()
    assert a_new.admitted.wait(5)
    a_new.done()


def test_past_its_parked_allowance_a_job_keeps_its_slot():
    queue, order = AdmissionQueue(slots=2, max_queue=8, burst=0, tenant_max_parked=1), []
    a1, a2 = Holder(queue, "A", order), Holder(queue, "A", order)
    assert a1.admitted.wait(5) and a2.admitted.wait(5)
    a1.park.set()
    a2.park.set()
    assert a1.parked.wait(5) and a2.parked.wait(5)
    assert queue.parked_jobs == 1 and queue.running == 1
    a1.unpark.set()
    a2.unpark.set()
    assert a1.resumed.wait(5) and a2.resumed.wait(5)
    assert queue.parked_jobs == 0 and queue.running == 2
    a1.done()
    a2.done()
    assert queue.running == 0


def test_a_cancelled_resume_gives_nothing_back_twice():
    """A parked job cancelled while it waits for its slot again ends without holding one."""
    queue, order = AdmissionQueue(slots=1, max_queue=8, burst=0), []
    a = Holder(queue, "A", order)
    assert a.admitted.wait(5)
    a.park.set()
    assert a.parked.wait(5)
    b = Holder(queue, "B", order)
    assert b.admitted.wait(5)
    a.unpark.set()
    _settle()
    a.cancel.set()
    a.thread.join(5)
    assert isinstance(a.error, Cancelled)
    assert queue.running == 1 and queue.parked_jobs == 0 and not queue.load().get("A")
    b.done()
    assert queue.running == 0


def test_a_full_queue_makes_room_for_another_caller_by_dropping_the_longest_queues_newest():
    queue, order = AdmissionQueue(slots=1, max_queue=3, burst=0), []
    running = Holder(queue, "A", order)
    assert running.admitted.wait(5)
    a = [Holder(queue, "A", order, f"A{k}") for k in range(3)]
    _settle()
    assert queue.queued == 3
    extra = Holder(queue, "A", order, "A-extra")  # A against its own full queue: refused
    extra.thread.join(5)
    assert isinstance(extra.error, ResourceExhausted)
    assert "server's queue is full" in str(extra.error) and "global limit is 3" in str(extra.error)
    assert extra.error.retry_after_s > 0
    b = Holder(queue, "B", order)
    a[2].thread.join(5)  # A's newest waiter gave its place
    assert isinstance(a[2].error, ResourceExhausted) and "gave its place" in str(a[2].error)
    assert a[2].error.retry_after_s > 0
    assert queue.queued == 3 and queue.load()["B"].queued == 1 and b.error is None
    running.done()
    assert b.admitted.wait(5) and order[-1] == "B"
    for h in [b, *a[:2]]:
        h.done()


def test_a_callers_own_queue_limit_names_itself():
    queue = AdmissionQueue(slots=1, max_queue=8, burst=0, tenant_max_queue=1)
    order = []
    running, waiting = Holder(queue, "A", order), None
    assert running.admitted.wait(5)
    waiting = Holder(queue, "A", order)
    _settle()
    refused = Holder(queue, "A", order)
    refused.thread.join(5)
    assert isinstance(refused.error, ResourceExhausted)
    assert "your queue is full" in str(refused.error) and "per-tenant limit is 1" in str(refused.error)
    other = Holder(queue, "B", order)  # another caller still queues
    _settle()
    assert other.error is None and queue.load()["B"].queued == 1
    for h in (running, waiting, other):
        h.done()


def test_alone_a_caller_uses_the_whole_queue_as_before():
    queue, order = AdmissionQueue(slots=2, max_queue=4), []
    holders = [Holder(queue, "solo", order) for _ in range(6)]
    _settle()
    assert queue.running == 2 and queue.queued == 4 and not any(h.error for h in holders)
    refused = Holder(queue, "solo", order)
    refused.thread.join(5)
    assert isinstance(refused.error, ResourceExhausted)
    for h in holders:
        h.done()
    assert order == ["solo"] * 6


def test_bad_weights_are_refused():
    with pytest.raises(ValueError):
        AdmissionQueue(slots=1, weights={"A": 0.0})
