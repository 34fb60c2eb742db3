"""The batching engine on real networks (the embedded digits UNet, the analytic mixture), from
threads as the service drives it: batched calls equal solo calls, the backward's VJPs batch and
split exactly, callers share fairly, a failure or a cancel stays with its own job."""

import contextlib
import threading
import time

import pytest
import torch

from adjointdpm_server.core import sample
from adjointdpm_server.engine import NetworkEngine
from adjointdpm_server.engine._work import SOLO, WorkItem
from adjointdpm_server.errors import Cancelled
from adjointdpm_server.models import load_model
from adjointdpm_server.tasks import LocalJob


@pytest.fixture(scope="module")
def digits64():
    return load_model("digits", dtype=torch.float64)


@pytest.fixture(scope="module")
def mixture64():
    return load_model("gaussian-mixture", dtype=torch.float64)


def _in_threads(fns):
    """Run each fn in its own thread; return results in order (re-raising the first error)."""
    out, errors = [None] * len(fns), [None] * len(fns)

    def run(k):
        try:
            out[k] = fns[k]()
        except BaseException as err:  # noqa: BLE001
            errors[k] = err

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(fns))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    return out, errors


@contextlib.contextmanager
def _sessions(engine, jobs):
    """All jobs active before any thread starts (as admitted jobs are in the service)."""
    with contextlib.ExitStack() as stack:
        for job in jobs:
            stack.enter_context(engine.session(job))
        yield


def _inputs(backend, k, rows=2):
    gen = torch.Generator().manual_seed(k)
    x = torch.randn((rows, *backend.latent_shape), generator=gen, dtype=torch.float64)
    t = torch.rand(rows, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    if backend.conditioning != "labels":
        return x, t, None
    cond = backend.embed(backend.encode(rows, labels=[(k + j) % 10 for j in range(rows)])).cond
    return x, t, cond


def test_batched_forward_equals_solo(digits64):
    engine = NetworkEngine(max_batch=64, window_ms=2000)
    jobs = [LocalJob(caller=f"c{k}") for k in range(6)]
    inputs = [_inputs(digits64, k) for k in range(6)]

    def call(job, x, t, c):
        with torch.no_grad():
            return engine.network(digits64.eps_fn, job)(x, t, c)

    with _sessions(engine, jobs):
        out, errors = _in_threads([lambda j=j, a=a: call(j, *a) for j, a in zip(jobs, inputs)])
    assert errors == [None] * 6
    assert engine.stats.calls["forward"] == 1 and engine.stats.items["forward"] == 6
    assert engine.stats.max_rows == 12
    for got, (x, t, c) in zip(out, inputs):
        with torch.no_grad():
            want = digits64.eps_fn(x, t, c)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_batched_vjp_splits_exactly(digits64):
    engine = NetworkEngine(max_batch=64, window_ms=2000)
    jobs = [LocalJob(caller=f"c{k}") for k in range(4)]
    inputs = [_inputs(digits64, 10 + k) for k in range(4)]
    cots = [torch.randn_like(a[0]) for a in inputs]

    def call(job, x, t, c, cot):
        return engine.network(digits64.eps_fn, job).vjp(x, t, c, cot, True)

    with _sessions(engine, jobs):
        out, errors = _in_threads([lambda j=j, a=a, v=v: call(j, *a, v)
                                   for j, a, v in zip(jobs, inputs, cots)])
    assert errors == [None] * 4
    assert engine.stats.calls["vjp"] == 1 and engine.stats.items["vjp"] == 4
    for (eps, gx, gc, _), (x, t, c), cot in zip(out, inputs, cots):
        xl, cl = x.clone().requires_grad_(), c.clone().requires_grad_()
        want = digits64.eps_fn(xl, t, cl)
        wx, wc = torch.autograd.grad(want, [xl, cl], cot)
        torch.testing.assert_close(eps, want.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gx, wx, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gc, wc, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("grad_mode,solver,prediction", [
    ("checkpoint", "dpm3", "epsilon"), ("adjoint", "ab3", "epsilon"), ("checkpoint", "heun", "epsilon"),
    ("backprop", "euler", "epsilon"), ("checkpoint", "dpm3", "velocity"), ("adjoint", "dpm2", "sample")])
def test_sample_gradients_through_the_engine_equal_solo(digits64, grad_mode, solver, prediction):
    """Four jobs in lockstep with CFG: x_0 and ∂/∂x_T, ∂/∂cond equal the solo run (float64).
    Read as another ``prediction`` the network defines another field; the engine's VJP path
    (cotangent scaled by ``a``, ``α b ε̄`` added) must still equal autograd through it."""
    backend = digits64
    engine = NetworkEngine(max_batch=64, window_ms=500)

    def run(k, network):
        x_T = backend.noise(2, seed=k).to(torch.float64).requires_grad_()
        c = backend.embed(backend.encode(2, labels=[k, k + 1]))
        cond = c.cond.detach().clone().requires_grad_()
        x0 = sample(network, x_T, cond, schedule=backend.schedule, steps=4, solver=solver,
                    grad_mode=grad_mode, guidance_scale=2.0, uncond=c.uncond, prediction=prediction)
        loss = (x0 * torch.linspace(-1, 1, x0.numel(), dtype=x0.dtype).reshape(x0.shape)).sum()
        return (x0.detach(), *torch.autograd.grad(loss, [x_T, cond]))

    jobs = [LocalJob(caller=f"c{k}") for k in range(4)]
    with _sessions(engine, jobs):
        out, errors = _in_threads([lambda k=k, j=j: run(k, engine.network(backend.eps_fn, j))
                                   for k, j in enumerate(jobs)])
    assert errors == [None] * 4
    for k, got in enumerate(out):
        want = run(k, backend.eps_fn)
        for g, w in zip(got, want):
            assert float((g - w).norm()) <= 1e-10 * float(w.norm())
    batched = {"checkpoint": "heun" != solver, "adjoint": True, "backprop": False}[grad_mode]
    if batched:  # the backward's network calls were shared too
        assert engine.stats.items["vjp"] >= 2 * engine.stats.calls["vjp"] > 0
    assert engine.stats.items["forward"] >= 2 * engine.stats.calls["forward"] > 0 or grad_mode == "backprop"


def test_callers_share_each_call_round_robin(mixture64):
    """Caller A has four jobs waiting, B one (queued last); a call of 8 samples takes one of
    each, not A's two oldest. The engine is kept busy by a third caller while they queue."""
    engine = NetworkEngine(max_batch=8, window_ms=3000)
    a_jobs = [LocalJob(caller="A") for _ in range(4)]
    b_job, c_job = LocalJob(caller="B"), LocalJob(caller="C")
    x, t, _ = _inputs(mixture64, 0, rows=4)

    def busy():
        engine.submit(WorkItem(SOLO, None, c_job, "C", "", 1, closure=lambda: time.sleep(1.5)))

    def call(job, delay):
        def run():
            time.sleep(delay)
            with torch.no_grad():
                return engine.network(mixture64.eps_fn, job)(x, t, None)
        return run

    out, errors = _in_threads([busy] + [call(j, 0.2) for j in a_jobs] + [call(b_job, 0.8)])
    assert errors == [None] * 6
    batches = [callers for kind, callers in engine.stats.recent if kind == "forward"]
    assert sorted(batches[0]) == ["A", "B"]
    assert [len(b) for b in batches] == [2, 2, 1]  # 8-sample calls: 4 + 4, 4 + 4, 4


def test_a_failing_input_fails_only_its_own_job(digits64):
    """A label out of range makes the batched call raise; the engine retries each job alone."""
    engine = NetworkEngine(max_batch=64, window_ms=2000)
    good = [LocalJob(caller=f"g{k}") for k in range(3)]
    bad = LocalJob(caller="bad")
    x, t, _ = _inputs(digits64, 3)
    labels = torch.tensor([1, 2])

    def call(job, c):
        def run():
            with torch.no_grad():
                return engine.network(digits64.eps_fn, job)(x, t, c)
        return run

    with _sessions(engine, good + [bad]):
        out, errors = _in_threads([call(j, labels) for j in good] + [call(bad, torch.tensor([3, 99]))])
    assert errors[:3] == [None] * 3 and isinstance(errors[3], IndexError)
    with torch.no_grad():
        want = digits64.eps_fn(x, t, labels)
    for got in out[:3]:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_cancelled_job_withdraws_its_pending_call(mixture64):
    """A job waiting for a batch (another runnable job has not submitted) is cancelled: its call
    leaves the queue unrun and the job stops at once, not after the window."""
    engine = NetworkEngine(max_batch=64, window_ms=10_000)
    idle, job = LocalJob(caller="idle"), LocalJob(caller="me")
    x, t, _ = _inputs(mixture64, 1)
    result = {}

    def run():
        with engine.session(job):
            start = time.monotonic()
            try:
                with torch.no_grad():
                    engine.network(mixture64.eps_fn, job)(x, t, None)
            except Cancelled:
                result["stopped_after"] = time.monotonic() - start

    with engine.session(idle):
        th = threading.Thread(target=run)
        th.start()
        time.sleep(0.3)
        job.cancelled.set()
        th.join(5)
    assert result["stopped_after"] < 1.0
    time.sleep(0.1)
    assert engine.stats.calls["forward"] == 0  # never run


def test_a_parked_job_holds_no_turn(mixture64):
    """A job waiting for its client is parked: others' calls do not wait the window for it."""
    engine = NetworkEngine(max_batch=64, window_ms=5_000)
    waiting, job = LocalJob(caller="slow"), LocalJob(caller="me")
    x, t, _ = _inputs(mixture64, 2)
    with engine.session(waiting), engine.parked(waiting), engine.session(job):
        start = time.monotonic()
        with torch.no_grad():
            engine.network(mixture64.eps_fn, job)(x, t, None)
        assert time.monotonic() - start < 1.0
        assert engine.waiting_client == 1 and engine.active == 2
    assert engine.waiting_client == 0 and engine.active == 0


def test_window_zero_runs_every_call_alone(mixture64):
    engine = NetworkEngine(max_batch=64, window_ms=0)
    jobs = [LocalJob(caller=f"c{k}") for k in range(4)]
    x, t, _ = _inputs(mixture64, 5)

    def call(job):
        with torch.no_grad():
            return engine.network(mixture64.eps_fn, job)(x, t, None)

    with _sessions(engine, jobs):
        out, errors = _in_threads([lambda j=j: call(j) for j in jobs])
    assert errors == [None] * 4
    assert engine.stats.calls["forward"] == engine.stats.items["forward"] == 4
    assert not engine._queues and not engine._last_done and not engine._trainers  # nothing kept once idle


def test_the_window_waits_for_a_job_between_its_calls(mixture64):
    """A job that has run one call and not yet made its next is still waited for: B's call,
    submitted while A computes between calls, runs together with A's second call (the pending
    count of A returned to zero after its first call, so A counts as not yet submitted)."""
    engine = NetworkEngine(max_batch=64, window_ms=3_000)
    a, b = LocalJob(caller="A"), LocalJob(caller="B")
    x, t, _ = _inputs(mixture64, 6)

    def call(job):
        with torch.no_grad():
            return engine.network(mixture64.eps_fn, job)(x, t, None)

    def job_a():
        call(a)           # alone: B is parked until A's first call is done
        time.sleep(0.5)   # A "computes" between calls; B submits meanwhile
        return call(a)

    def job_b():
        with engine.parked(b):
            while engine.stats.calls["forward"] < 1:
                time.sleep(0.01)
        return call(b)

    with _sessions(engine, [a, b]):
        out, errors = _in_threads([job_a, job_b])
    assert errors == [None, None]
    batches = [sorted(callers) for kind, callers in engine.stats.recent if kind == "forward"]
    assert batches == [["A"], ["A", "B"]]
