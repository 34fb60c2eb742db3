"""Admission's promises held directly: FIFO order among waiters, a waiter that is cancelled or
runs out of time leaves the queue and the next one starts, a running job past its deadline ends
with DEADLINE_EXCEEDED and stops, and a draining server refuses new work."""

from __future__ import annotations

import threading
import time

import pytest

import adjointdpm
from adjointdpm_server.config import Limits, ServerConfig
from adjointdpm_server.errors import Cancelled, DeadlineExceeded, Unavailable
from adjointdpm_server.admission.queue import AdmissionQueue
from adjointdpm_server.wire import build_server


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class _Waiter(threading.Thread):
    """Takes a slot of ``scheduler``, records when it got it, holds it until ``release``."""

    def __init__(self, scheduler, name, order, check=lambda: None):
        super().__init__(daemon=True)
        self.scheduler, self.name, self.order, self.check = scheduler, name, order, check
        self.positions, self.release, self.error = [], threading.Event(), None

    def run(self):
        try:
            with self.scheduler.slot(self.check, self.positions.append):
                self.order.append(self.name)
                self.release.wait(30)
        except BaseException as err:  # noqa: BLE001
            self.error = err


def _queue(scheduler, waiters):
    """Start the waiters one after another, each queued before the next starts."""
    for k, w in enumerate(waiters):
        w.start()
        _wait_for(lambda k=k: scheduler.queued == k + 1)


def test_waiters_start_in_arrival_order_and_learn_their_positions():
    scheduler, order = AdmissionQueue(slots=1, max_queue=8), []
    holder = _Waiter(scheduler, "holder", order)
    holder.start()
    _wait_for(lambda: order == ["holder"])
    waiters = [_Waiter(scheduler, f"w{k}", order) for k in range(4)]
    _queue(scheduler, waiters)
    holder.release.set()
    for w in waiters:  # each runs alone, in turn
        _wait_for(lambda w=w: order[-1] == w.name)
        w.release.set()
    for w in waiters:
        w.join(10)
    assert order == ["holder", "w0", "w1", "w2", "w3"]
    assert waiters[3].positions == [4, 3, 2, 1, 0]  # told as it moved up, then 0 on starting
    assert scheduler.running == 0 and scheduler.queued == 0


@pytest.mark.parametrize("error", [Cancelled("cancelled"), DeadlineExceeded("too late")])
def test_a_waiter_that_gives_up_leaves_the_queue_and_the_next_starts(error):
    scheduler, order = AdmissionQueue(slots=1, max_queue=8), []
    holder = _Waiter(scheduler, "holder", order)
    holder.start()
    _wait_for(lambda: order == ["holder"])
    gives_up = threading.Event()

    def check():
        if gives_up.is_set():
            raise error

    quitter = _Waiter(scheduler, "quitter", order, check)
    after = _Waiter(scheduler, "after", order)
    _queue(scheduler, [quitter, after])
    gives_up.set()
    _wait_for(lambda: quitter.error is not None)
    assert type(quitter.error) is type(error)
    assert scheduler.queued == 1  # only "after" waits now, at position 1
    _wait_for(lambda: after.positions[-1] == 1)
    holder.release.set()
    _wait_for(lambda: order[-1] == "after")
    after.release.set()
    after.join(10)
    assert order == ["holder", "after"]


def test_a_closed_scheduler_refuses_new_work_and_lets_admitted_jobs_finish():
    scheduler, order = AdmissionQueue(slots=1, max_queue=8), []
    holder = _Waiter(scheduler, "holder", order)
    holder.start()
    _wait_for(lambda: order == ["holder"])
    scheduler.close()
    late = _Waiter(scheduler, "late", order)
    late.start()
    late.join(10)
    assert isinstance(late.error, Unavailable)
    holder.release.set()
    holder.join(10)
    assert order == ["holder"] and holder.error is None


def test_a_job_past_its_deadline_ends_deadline_exceeded_and_stops(tmp_path):
    """--max-request-seconds 1: a 400-step Sample ends with DEADLINE_EXCEEDED about then (not
    RESOURCE_EXHAUSTED: nothing else is queued), and its job stops."""
    srv = build_server(ServerConfig(models=("digits",), port=0, artifact_dir=tmp_path / "a",
                                    max_request_s=1.0, limits=Limits(max_steps=1000)))
    try:
        with adjointdpm.Client(f"127.0.0.1:{srv.port}", timeout=60) as client:
            start = time.monotonic()
            with pytest.raises(adjointdpm.AdjointDPMError) as err:
                client.sample(labels=1, steps=400)
            took = time.monotonic() - start
            assert err.value.code.name == "DEADLINE_EXCEEDED", err.value.details
            assert 0.9 <= took < 3.0  # measured ≈ 1.05 s: the job stops within a network call
            _wait_for(lambda: srv.service.idle)
            assert client.sample(labels=1, steps=3).x0.shape == (1, 1, 8, 8)
    finally:
        srv.stop(0)


def test_a_draining_server_refuses_new_work(tmp_path):
    srv = build_server(ServerConfig(models=("digits",), port=0, artifact_dir=tmp_path / "a"))
    try:
        with adjointdpm.Client(f"127.0.0.1:{srv.port}", timeout=60) as client:
            client.sample(labels=1, steps=3)
            assert srv.service.drain(0.5)  # nothing runs: drained at once
            with pytest.raises(adjointdpm.AdjointDPMError) as err:
                client.sample(labels=1, steps=3)
            assert err.value.code.name == "UNAVAILABLE" and "shutting down" in err.value.details
    finally:
        srv.stop(0)
