"""The engine's share between callers counts what calls cost, not how many there are: start-time
fair queuing on measured seconds, per-caller weights, a large call run in chunks while others
wait (exact: float64 to 1e-10), and a sequential caller not made to wait behind a busier one's
whole call. Device time is simulated by calls that sleep, so the shares do not depend on the
machine's load; real networks check the chunks' exactness."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch

from adjointdpm_server.core import sample
from adjointdpm_server.engine import NetworkEngine
from adjointdpm_server.engine._work import SOLO, WorkItem
from adjointdpm_server.models import load_model
from adjointdpm_server.tasks import LocalJob


@pytest.fixture(scope="module")
def digits64():
    return load_model("digits", dtype=torch.float64)


def _busy(engine, job, seconds: float, stop: threading.Event, calls: list):
    """A job that keeps a call of ``seconds`` of (simulated) device time pending until stopped."""
    def loop():
        while not stop.is_set():
            engine.submit(WorkItem(SOLO, None, job, job.caller, "", 1,
                                   closure=lambda: time.sleep(seconds)))
            calls.append(job.caller)
    return threading.Thread(target=loop, daemon=True)


@contextlib.contextmanager
def _running(engine, jobs_seconds, duration: float):
    """Every (job, seconds) busy for ``duration``; yields the list of finished calls' callers."""
    stop, calls = threading.Event(), []
    with contextlib.ExitStack() as stack:
        for job, _ in jobs_seconds:
            stack.enter_context(engine.session(job))
        threads = [_busy(engine, job, s, stop, calls) for job, s in jobs_seconds]
        for th in threads:
            th.start()
        time.sleep(duration)
        stop.set()
        for th in threads:
            th.join(10)
        yield calls
    engine.close()


def test_callers_share_device_time_not_calls():
    """A's four jobs make 40 ms calls, B's one job 10 ms calls: B gets about as many device
    seconds as A (so ~4 calls for each of A's), not one call for each of A's (round robin by
    calls gave A 80% of the device)."""
    engine = NetworkEngine(max_batch=8, window_ms=5)
    a_jobs = [LocalJob(caller="A") for _ in range(4)]
    with _running(engine, [(j, 0.04) for j in a_jobs] + [(LocalJob(caller="B"), 0.01)], 2.0) as calls:
        a, b = calls.count("A"), calls.count("B")
    work = engine.stats.work
    assert b >= 2.5 * a, (a, b)
    assert 0.6 <= work["B"] / work["A"] <= 1.6, dict(work)


def test_weights_set_the_shares():
    """Weight 3 against 1, equal calls, both always waiting: A gets three times B's time."""
    engine = NetworkEngine(max_batch=8, window_ms=5, weights={"A": 3.0})
    jobs = [(LocalJob(caller=c), 0.01) for c in ("A", "A", "B", "B")]
    with _running(engine, jobs, 2.0):
        pass
    ratio = engine.stats.work["A"] / engine.stats.work["B"]
    assert 2.2 <= ratio <= 4.0, dict(engine.stats.work)


def test_a_sequential_caller_is_not_made_to_wait_behind_a_busier_ones_calls():
    """B sends ten short calls one after another (a solver's steps); A keeps long calls pending.
    The engine waits (≤ window) for B's next call instead of starting one of A's between each:
    few of A's calls run between B's first and last (one each time without the anticipation)."""
    engine = NetworkEngine(max_batch=8, window_ms=20)
    a_jobs, b_job = [LocalJob(caller="A") for _ in range(2)], LocalJob(caller="B")
    stop, calls = threading.Event(), []
    with engine.session(a_jobs[0]), engine.session(a_jobs[1]), engine.session(b_job):
        threads = [_busy(engine, j, 0.03, stop, calls) for j in a_jobs]
        for th in threads:
            th.start()
        time.sleep(0.2)
        for _ in range(10):
            engine.submit(WorkItem(SOLO, None, b_job, "B", "", 1, closure=lambda: time.sleep(0.003)))
            calls.append("B")
            time.sleep(0.001)  # the job's own work between two calls
        stop.set()
        for th in threads:
            th.join(10)
    engine.close()
    first, last = calls.index("B"), len(calls) - 1 - calls[::-1].index("B")
    between = calls[first:last].count("A")
    assert between <= 3, calls[first:last + 1]


def _other_caller_active(engine):
    """A job of another caller holds a session: the engine chunks large calls."""
    return engine.session(LocalJob(caller="other"))


def _inputs(backend, rows, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((rows, *backend.latent_shape), generator=gen, dtype=torch.float64)
    t = torch.rand(rows, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    cond = backend.embed(backend.encode(rows, labels=[k % 10 for k in range(rows)])).cond
    return x, t, cond


def test_a_chunked_forward_and_vjp_equal_the_whole_call(digits64):
    engine = NetworkEngine(max_batch=64, window_ms=5, chunk_rows=3)
    job = LocalJob(caller="big")
    x, t, cond = _inputs(digits64, 10)
    cot = torch.randn_like(x)
    with engine.session(job), _other_caller_active(engine), torch.no_grad():
        network = engine.network(digits64.eps_fn, job)
        eps = network(x, t, cond)
        eps_v, gx, gc, _ = network.vjp(x, t, cond, cot, True)
    engine.close()
    assert engine.stats.chunks == 6  # 10 rows in chunks of 3 (+ the last 1), twice
    assert engine.stats.calls["forward"] == engine.stats.calls["vjp"] == 4
    xl, cl = x.clone().requires_grad_(), cond.clone().requires_grad_()
    want = digits64.eps_fn(xl, t, cl)
    wx, wc = torch.autograd.grad(want, [xl, cl], cot)
    for got, ref in ((eps, want), (eps_v, want), (gx, wx), (gc, wc)):
        assert got.shape == ref.shape
        assert float((got - ref).detach().abs().max()) <= 1e-10 * float(ref.detach().abs().max())


def test_a_gradient_through_chunked_calls_equals_the_unsplit_one(digits64):
    """A whole CFG sample's x_0, ∂/∂x_T and ∂/∂cond with every call chunked (float64)."""
    def run(network):
        x_T = digits64.noise(3, seed=5).to(torch.float64).requires_grad_()
        c = digits64.embed(digits64.encode(3, labels=[1, 4, 7]))
        cond = c.cond.detach().clone().requires_grad_()
        x0 = sample(network, x_T, cond, schedule=digits64.schedule, steps=4, solver="dpm3",
                    grad_mode="adjoint", guidance_scale=2.0, uncond=c.uncond)
        loss = (x0 * torch.linspace(-1, 1, x0.numel(), dtype=x0.dtype).reshape(x0.shape)).sum()
        return (x0.detach(), *torch.autograd.grad(loss, [x_T, cond]))

    engine = NetworkEngine(max_batch=64, window_ms=5, chunk_rows=2)
    job = LocalJob(caller="big")
    with engine.session(job), _other_caller_active(engine):
        got = run(engine.network(digits64.eps_fn, job))
    engine.close()
    assert engine.stats.chunks > 0
    for g, w in zip(got, run(digits64.eps_fn)):
        assert float((g - w).norm()) <= 1e-10 * float(w.norm())


def test_alone_a_caller_runs_whole_calls(digits64):
    """Nobody else has work: no chunks (a single tenant keeps today's speed)."""
    engine = NetworkEngine(max_batch=64, window_ms=5, chunk_rows=3)
    job = LocalJob(caller="big")
    x, t, cond = _inputs(digits64, 10)
    with engine.session(job), torch.no_grad():
        engine.network(digits64.eps_fn, job)(x, t, cond)
    engine.close()
    assert engine.stats.chunks == 0 and engine.stats.calls["forward"] == 1


def test_a_job_parked_on_its_client_shares_no_calls():
    """``auto`` keeps graphs when no other job could share its calls: a job waiting for its
    client makes none (it used to turn its neighbours' gradients into recomputing ones)."""
    engine = NetworkEngine(max_batch=8, window_ms=5)
    a, b = LocalJob(caller="A"), LocalJob(caller="B")
    with engine.session(a), engine.session(b):
        assert engine.shares_calls()
        with engine.parked(a):
            assert not engine.shares_calls()
        assert engine.shares_calls()
    assert not engine.shares_calls()


def test_an_exclusive_turn_holds_the_device_and_is_charged_to_its_caller():
    """A weight-training backward runs in its job's thread inside ``exclusive``: B's call waits
    for the turn to end, A's own calls in it run inline (no deadlock), and A pays the turn."""
    engine = NetworkEngine(max_batch=8, window_ms=5)
    a, b = LocalJob(caller="A"), LocalJob(caller="B")
    order = []

    def b_call():
        engine.submit(WorkItem(SOLO, None, b, "B", "", 1, closure=lambda: order.append("B")))

    with engine.session(a), engine.session(b):
        with engine.exclusive(a):
            worker = threading.Thread(target=b_call)
            worker.start()
            time.sleep(0.3)
            inner = engine.submit(WorkItem(SOLO, None, a, "A", "", 1, closure=lambda: "inline"))
            order.append("A")
        worker.join(10)
    engine.close()
    assert inner == "inline" and order == ["A", "B"]
    assert engine.stats.work["A"] >= 0.3 > engine.stats.work["B"]


def test_a_cancelled_job_waiting_for_its_exclusive_turn_leaves_the_queue():
    engine = NetworkEngine(max_batch=8, window_ms=5)
    a, b = LocalJob(caller="A"), LocalJob(caller="B")
    with engine.session(a), engine.session(b), engine.exclusive(a):
        b.cancelled.set()
        with pytest.raises(Exception) as err:
            with engine.exclusive(b):
                pass
        assert type(err.value).__name__ == "Cancelled"
        assert not engine._queues  # its turn was withdrawn
    engine.close()


def test_alone_an_exclusive_turn_takes_nothing():
    """No other caller's work: the pass runs beside the engine's calls as before (no turn)."""
    engine = NetworkEngine(max_batch=8, window_ms=5)
    a = LocalJob(caller="A")
    with engine.session(a), engine.exclusive(a):
        assert engine.submit(WorkItem(SOLO, None, a, "A", "", 1, closure=lambda: 7)) == 7
    engine.close()
    assert engine.stats.calls["lease"] == 0 and engine.stats.calls["solo"] == 1


def test_a_sampling_job_is_no_company_for_a_gradients_vjps(digits64):
    """``auto`` recomputes to batch its VJPs only beside jobs that may make VJP calls: those that
    asked (gradient jobs) and those that have made no call yet — not a job that only samples."""
    engine = NetworkEngine(max_batch=8, window_ms=5)
    sampler, grad, newcomer = (LocalJob(caller=c) for c in ("A", "B", "C"))
    x, t, cond = _inputs(digits64, 2)
    with engine.session(sampler), engine.session(grad), torch.no_grad():
        engine.network(digits64.eps_fn, sampler)(x, t, cond)  # a forward call: it samples
        assert not engine.shares_calls(grad)
        with engine.session(newcomer):
            assert engine.shares_calls(grad)  # it may be a gradient job about to ask
    engine.close()


def test_auto_recomputes_only_from_share_from_gradient_jobs():
    """On a CPU ``share_from`` is above 2: a few gradient jobs keep graphs side by side (their
    backward passes use the other cores), more recompute to batch."""
    engine = NetworkEngine(max_batch=8, window_ms=5, share_from=3)
    jobs = [LocalJob(caller=f"c{k}") for k in range(3)]
    with engine.session(jobs[0]), engine.session(jobs[1]):
        assert not engine.shares_calls(jobs[0]) and engine.gradient_jobs(jobs[1]) == 2
        with engine.session(jobs[2]):
            assert engine.shares_calls(jobs[2])


def test_a_job_training_weights_is_no_company_for_a_gradients_vjps(digits64):
    """A fine-tune's calls build weight graphs and run solo: beside it a gradient job keeps its
    graphs (it recomputed for nothing, 1.6× the device time, under 16 fine-tunes)."""
    from adjointdpm_server.models._adapters import with_lora

    engine = NetworkEngine(max_batch=8, window_ms=5)
    trainer, grad = LocalJob(caller="A"), LocalJob(caller="B")
    with engine.session(trainer), engine.session(grad):
        assert engine.shares_calls(grad)  # the trainer has made no call: it may be one
        engine.network(with_lora(digits64.eps_fn, rank=2), trainer)
        assert not engine.shares_calls(grad)
    engine.close()
