"""Truncated gradients (DRaFT-K), held against a hand-written truncated backprop in float64.

``truncate=K`` must be exactly what a person would write by hand: the same sampler, with the
network calls of the first N−K steps made without a graph (their outputs constants) and no
gradient into x_T; and ``K = N`` must be the exact gradient."""

from __future__ import annotations

import pytest
import torch

from adjointdpm_server.core import VPSchedule, sample

SCH = VPSchedule.linear()
STEPS = 8
MODES = ("auto", "checkpoint", "adjoint")
SOLVERS = ("dpm3", "dpm2", "heun")


def _problem():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, dtype=torch.float64, generator=gen).requires_grad_(True)
    cond = torch.randn(1, 3, dtype=torch.float64, generator=gen).requires_grad_(True)
    x_T = torch.randn(2, 3, dtype=torch.float64, generator=gen).requires_grad_(True)

    def eps(x, t, c):
        return torch.tanh(x * w) * 0.5 + 0.2 * torch.sin(c * (1 + t.reshape(-1, 1))) * x

    return eps, w, cond, x_T


def _loss(x0):
    return (x0 - 0.3).square().sum()


def _by_hand(solver: str, k: int):
    """Backprop through the sampler, the first N−K steps' network calls made without a graph
    (one-step solvers call the network more than once per step: their calls in those steps)."""
    eps, w, cond, x_T = _problem()
    calls_per_step = {"heun": 2}.get(solver, 1)
    seen = []

    def truncated(x, t, c):
        seen.append(None)
        if len(seen) <= (STEPS - k) * calls_per_step:
            with torch.no_grad():
                return eps(x.detach(), t, c.detach())
        return eps(x, t, c)

    x0 = sample(truncated, x_T, cond, schedule=SCH, steps=STEPS, solver=solver, grad_mode="backprop",
                params=[w])
    grads = torch.autograd.grad(_loss(x0), [w, cond], allow_unused=True)
    return [torch.zeros_like(v) if g is None else g for g, v in zip(grads, (w, cond))], x0.detach()


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("mode", MODES)
def test_truncated_gradient_is_the_hand_written_truncated_backprop(solver, mode):
    for k in (1, 3):
        eps, w, cond, x_T = _problem()
        x0 = sample(eps, x_T, cond, schedule=SCH, steps=STEPS, solver=solver, grad_mode=mode,
                    params=[w], truncate=k, memory_budget=1e9 if mode != "checkpoint" else None)
        g_w, g_c, g_x = torch.autograd.grad(_loss(x0), [w, cond, x_T])
        (h_w, h_c), h_x0 = _by_hand(solver, k)
        assert torch.equal(x0.detach(), h_x0) or torch.allclose(x0.detach(), h_x0, rtol=1e-12, atol=1e-14)
        tol = 1e-10 if mode != "adjoint" else None
        if tol is None:  # adjoint: the re-solved trajectory's own error, as for the exact gradient
            assert float((g_w - h_w).norm() / h_w.norm()) < 0.1
            continue
        assert torch.allclose(g_w, h_w, rtol=tol, atol=1e-13), (k, g_w, h_w)
        assert torch.allclose(g_c, h_c, rtol=tol, atol=1e-13), (k, g_c, h_c)
        assert torch.count_nonzero(g_x) == 0  # the state entering the last K steps is a constant


@pytest.mark.parametrize("mode", MODES)
def test_truncating_at_every_step_is_the_exact_gradient(mode):
    eps, w, cond, x_T = _problem()
    exact = torch.autograd.grad(_loss(sample(eps, x_T, cond, schedule=SCH, steps=STEPS,
                                             grad_mode=mode, params=[w])), [w, cond, x_T])
    for k in (STEPS, STEPS + 5):
        full = torch.autograd.grad(_loss(sample(eps, x_T, cond, schedule=SCH, steps=STEPS, grad_mode=mode,
                                                params=[w], truncate=k)), [w, cond, x_T])
        for a, b in zip(exact, full):
            assert torch.equal(a, b)


def test_a_shorter_truncation_is_a_different_approximation():
    """K = 1 and K = 3 differ from each other and from the exact gradient (the option acts)."""
    eps, w, cond, x_T = _problem()
    grads = {}
    for k in (1, 3, None):
        x0 = sample(eps, x_T, cond, schedule=SCH, steps=STEPS, grad_mode="checkpoint", params=[w], truncate=k)
        grads[k] = torch.autograd.grad(_loss(x0), [w])[0]
    assert not torch.allclose(grads[1], grads[3]) and not torch.allclose(grads[3], grads[None])


def test_bad_truncations_are_refused():
    eps, w, cond, x_T = _problem()
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="truncate"):
            sample(eps, x_T, cond, schedule=SCH, steps=STEPS, params=[w], truncate=bad)
    with pytest.raises(ValueError, match="truncate needs"):
        sample(eps, x_T, cond, schedule=SCH, steps=STEPS, grad_mode="backprop", truncate=2)


def test_auto_keeps_graphs_only_for_the_steps_with_a_gradient():
    """However large the budget, ``auto`` builds graphs in its forward pass for the last K
    steps only: the earlier ones would never be taken back (memory for nothing)."""
    eps, w, cond, x_T = _problem()
    with_graph = []

    def watched(x, t, c):
        with_graph.append(torch.is_grad_enabled())
        return eps(x, t, c)

    x0 = sample(watched, x_T, cond, schedule=SCH, steps=STEPS, grad_mode="auto", params=[w],
                truncate=3, memory_budget=1e12)
    # the first call builds its graph to measure it (how many fit), then keeps none of it
    assert with_graph == [True] + [False] * (STEPS - 4) + [True] * 3
    torch.autograd.grad(_loss(x0), [w])
    assert len(with_graph) == STEPS  # every kept graph was taken back: no recomputation
