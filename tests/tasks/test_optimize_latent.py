"""run_optimize_latent in process: results and Iteration events, the optimizer's steps and
schedule, constraints, stop_when, guided sampling, cancellation."""

import math

import pytest
import torch

from adjointdpm_server.errors import Cancelled
from adjointdpm_server.tasks import LocalJob, run_compute_gradient, run_optimize_latent, run_sample

from .conftest import (STEPS, client, client_mse, constant_loss, engine_calls, finite, gen, is_png,
                       mse, opts, reports, solves)


def test_result_shapes_and_one_iteration_event_per_step(ctx, target):
    spec = gen(2, labels=(1, 7))
    job = LocalJob()
    result = run_optimize_latent(ctx, spec, [mse(target)], job, opts("OptimizeLatent", lr=0.1, iterations=2))
    for t in (result.x_T, result.x0, result.last_x_T):
        assert t.shape == (2, 1, 8, 8) and finite(t)
    assert len(result.images) == len(result.initial_images) == 2
    assert all(is_png(p) for p in result.images + result.initial_images)
    assert result.iterations_run == 2 and len(result.history) == 2
    assert len(result.sample_losses) == 2 and result.loss == pytest.approx(sum(result.sample_losses))
    assert result.stopped == [False, False]

    its = reports(job.events)
    assert [r.iteration for r in its] == [0, 1]
    assert [r.loss for r in its] == result.history
    for r in its:
        assert r.lr == pytest.approx(0.1) and math.isfinite(r.grad_norm) and r.grad_norm > 0
        assert r.x_T.shape == (2, 1, 8, 8) and len(r.sample_losses) == 2
        assert sum(r.sample_losses) == pytest.approx(r.loss) and r.loss_terms == [pytest.approx(r.loss)]
        assert r.images == []  # image_every 0: PNGs only at the end
    assert torch.equal(its[0].x_T, spec.x_T)  # iteration 0 evaluates the start
    assert not torch.allclose(its[1].x_T, spec.x_T)
    # each sample keeps its best iterate: never worse than any it reported
    for k in range(2):
        assert result.sample_losses[k] <= min(r.sample_losses[k] for r in its) + 1e-7
        best = result.best_iteration[k]
        assert 0 <= best <= 2
        want = its[best].x_T[k] if best < 2 else result.last_x_T[k]
        torch.testing.assert_close(result.x_T[k], want)

    # order: the unguided start, then per iteration its forward and backward solves, its report
    # (progress carries the iteration), then the last iterate's sample
    order = [(type(e).__name__, e.iteration, getattr(e, "phase", "")) for e in job.events]
    i0, i1 = order.index(("IterationReport", 0, "")), order.index(("IterationReport", 1, ""))
    assert {o for o in order[:i0] if o[0] != "IterationReport"} == {
        ("IterationProgress", 0, "forward"), ("IterationProgress", 0, "backward"),
        ("PlanReport", 0, "")}  # the memory plan: made in iteration 0, never changed after
    assert {o for o in order[i0 + 1:i1]} == {("IterationProgress", 1, "forward"),
                                             ("IterationProgress", 1, "backward")}
    assert {o for o in order[i1 + 1:]} == {("IterationProgress", 2, "forward")}
    parts = solves(job.events)
    assert [p[0].phase for p in parts] == ["forward", "forward", "backward", "forward", "backward", "forward"]
    for part in parts:
        assert [e.step for e in part] == list(range(1, STEPS + 1))
        if part[0].phase == "forward":  # nfe counts each solve's calls as they happen
            assert [e.nfe for e in part] == list(range(1, STEPS + 1))


def test_sgd_steps_by_lr_times_the_gradient_on_the_schedule(ctx, target):
    """The first step is x_T − lr·∂L/∂x_T (the ComputeGradient of the same request); the second is
    as long as the linear schedule's lr/2 times the reported gradient norm."""
    spec = gen(1)
    grad = run_compute_gradient(ctx, spec, [mse(target)], LocalJob(), opts("ComputeGradient"))
    job = LocalJob()
    lr = 0.5
    result = run_optimize_latent(ctx, spec, [mse(target)], job, opts(
        "OptimizeLatent", optimizer="sgd", lr=lr, iterations=2, schedule="linear"))
    first, second = reports(job.events)
    assert [first.lr, second.lr] == pytest.approx([lr, lr / 2])
    assert first.loss == pytest.approx(grad.loss, rel=1e-6)
    assert first.grad_norm == pytest.approx(float(grad.gradients["x_T"].norm()), rel=1e-5)
    torch.testing.assert_close(second.x_T - first.x_T, -lr * grad.gradients["x_T"], rtol=1e-4, atol=1e-6)
    step = float((result.last_x_T - second.x_T).norm())
    assert step == pytest.approx(lr / 2 * second.grad_norm, rel=1e-4)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_constraint_keeps_x_T_within_epsilon_of_the_start(ctx, target, norm):
    spec = gen(1, steps=2)
    eps = 0.05
    job = LocalJob()
    result = run_optimize_latent(ctx, spec, [mse(target)], job, opts(
        "OptimizeLatent", lr=1.0, iterations=2, constraint=norm, epsilon=eps))

    def dist(x):
        d = (x - spec.x_T).flatten()
        return float(d.abs().max() if norm == "linf" else d.norm())

    for x in [r.x_T for r in reports(job.events)] + [result.x_T, result.last_x_T]:
        assert dist(x) <= eps * (1 + 1e-5)
    assert dist(result.last_x_T) >= 0.99 * eps  # lr 1 ≫ ε: the constraint is what held it


def test_stop_when_patience_stops_early_and_keeps_the_best_iterate(ctx):
    spec = gen(1, steps=2)
    calls = []
    job = LocalJob({"mine": constant_loss(calls=calls, moving=True)})
    result = run_optimize_latent(ctx, spec, [client()], job, opts(
        "OptimizeLatent", lr=0.1, iterations=10, stop_when={"patience": 2}))
    # the best stays iteration 0; 2 iterations without a new best → stop after iteration 2
    assert result.iterations_run == 3 and len(reports(job.events)) == 3
    assert result.stopped == [True] and result.best_iteration == [0]
    assert len(calls) == 3  # every sample stopped: no evaluation of a last iterate
    its = reports(job.events)
    assert not torch.allclose(its[1].x_T, spec.x_T) and not torch.allclose(its[2].x_T, its[1].x_T)
    torch.testing.assert_close(result.x_T, spec.x_T)  # the best iterate, not the last
    torch.testing.assert_close(result.last_x_T, spec.x_T)  # out of patience: frozen at its best


def test_stop_when_loss_below_stops_at_once(ctx, target):
    job = LocalJob()
    result = run_optimize_latent(ctx, gen(2, labels=(1, 7), steps=2), [mse(target)], job, opts(
        "OptimizeLatent", iterations=10, stop_when={"loss_below": 1e6}))
    assert result.iterations_run == 1 and result.stopped == [True, True]
    assert [r.iteration for r in reports(job.events)] == [0]


@pytest.mark.parametrize("every,inner", [(2, 2), (1, 1), (3, 1)])
def test_guided_sampling_makes_ceil_steps_over_every_times_inner_gradients(ctx, target, every, inner):
    spec = gen(1)
    calls = []
    job = LocalJob({"mine": client_mse(target, calls)})
    result = run_optimize_latent(ctx, spec, [client()], job, opts(
        "OptimizeLatent", lr=0.5, guided={"every": every, "inner_steps": inner}))
    n = math.ceil(STEPS / every) * inner
    its = reports(job.events)
    assert [r.iteration for r in its] == list(range(n)) and result.iterations_run == n
    assert len(result.history) == n and len(calls) == n + 1  # + the guided result's loss
    assert all(r.lr == pytest.approx(0.5) and r.grad_norm > 0 for r in its)  # scale unset: the lr
    assert torch.equal(result.x_T, spec.x_T)  # x_T is not what moves
    assert result.x0.shape == (1, 1, 8, 8) and finite(result.x0)
    plain = run_sample(ctx, spec, LocalJob(), opts("Sample", images=False)).x0
    assert float((result.x0 - plain).abs().max()) > 1e-3  # the guidance steered x_t


def test_cancel_from_the_loss_stops_within_one_network_call(ctx, runtime, target):
    job = LocalJob()
    seen = {}
    mine = client_mse(target)

    def cancelling(x):
        if len(reports(job.events)) == 1:  # in iteration 1
            seen["calls"] = engine_calls(runtime)
            job.cancelled.set()
        return mine(x)

    job.client_losses["mine"] = cancelling
    with pytest.raises(Cancelled):
        run_optimize_latent(ctx, gen(1, steps=4), [client()], job, opts("OptimizeLatent", iterations=5))
    assert [r.iteration for r in reports(job.events)] == [0]
    assert engine_calls(runtime) - seen["calls"] <= 1
