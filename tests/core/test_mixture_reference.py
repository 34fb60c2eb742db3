"""A nonlinear ODE: a well-separated Gaussian mixture against a float64 high-accuracy reference.

The reference is computed here with torchdiffeq (dopri8, rtol = atol = 1e-11) and its continuous
adjoint — an independent integrator — and cross-checked against our dpm3 at 1000 steps. Mixture:
4 components in d=64, means at distance 4 from the origin, scales 0.3–0.5, batch 8.
"""

import math

import pytest
import torch

from adjointdpm_server.core import GaussianMixture, VPSchedule, sample, sample_torchdiffeq


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _mixture(sch, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    d, k = 64, 4
    means = torch.randn(k, d, generator=g, dtype=torch.float64)
    means = 4.0 * means / means.norm(dim=1, keepdim=True)
    model = GaussianMixture(sch, means, torch.tensor([0.3, 0.4, 0.5, 0.35], dtype=torch.float64))
    x_T = torch.randn(8, d, generator=g, dtype=torch.float64)
    v = torch.randn(8, d, generator=g, dtype=torch.float64)
    return model.to(dtype), x_T.to(dtype), v.to(dtype)


@pytest.fixture(scope="module")
def reference():
    sch = VPSchedule.linear()
    model, x_T, v = _mixture(sch)
    x = x_T.clone().requires_grad_()
    x0 = sample_torchdiffeq(model, x, schedule=sch, ode="reparameterized", method="dopri8",
                            rtol=1e-11, atol=1e-11, grad_mode="adjoint")
    (g,) = torch.autograd.grad((x0 * v).sum(), x)
    return sch, x0.detach(), g


def _run(sch, solver, steps, mode):
    model, x_T, v = _mixture(sch)
    x = x_T.clone().requires_grad_()
    x0 = sample(model, x, schedule=sch, steps=steps, solver=solver, grad_mode=mode)
    (g,) = torch.autograd.grad((x0 * v).sum(), x)
    return x0.detach(), g


def test_reference_agrees_with_fine_dpm3(reference):
    sch, x0_ref, g_ref = reference
    x0, g = _run(sch, "dpm3", 1000, "checkpoint")
    assert _rel(x0, x0_ref) < 5e-7  # measured 1.9e-7 (dpm3 at 1000 steps is O(h³) away)
    assert _rel(g, g_ref) < 1e-5


# (solver, steps) → (x_0 bound, ∂/∂x_T bound): 1.5× the worse of checkpoint and adjoint as measured.
BOUNDS = {
    ("dpm3", 10): (3.7e-2, 0.27),
    ("dpm3", 20): (1.2e-2, 7.4e-2),
    ("dpm3", 50): (1.8e-3, 2.7e-2),
    ("dpm2", 20): (2.6e-2, 0.12),
    ("euler", 20): (0.12, 0.4),
    ("euler", 50): (4.9e-2, 0.14),
    ("ab4", 20): (3e-2, 0.26),
    ("ab4", 50): (2.5e-3, 2.4e-2),
    ("heun", 50): (4.8e-3, 1.1e-2),
    ("dopri5", 10): (4e-4, 5.3e-3),
}


@pytest.mark.parametrize("mode", ["checkpoint", "adjoint"])
@pytest.mark.parametrize("solver,steps", sorted(BOUNDS))
def test_mixture_within_bounds(reference, solver, steps, mode):
    sch, x0_ref, g_ref = reference
    x0, g = _run(sch, solver, steps, mode)
    fwd, grad = BOUNDS[solver, steps]
    assert _rel(x0, x0_ref) <= fwd
    assert _rel(g, g_ref) <= grad


def test_mixture_gradient_beats_prototype(reference):
    """docs/design.md §2 prototype, mixture, exact discrete dpm3 gradient: 8e-2 at NFE 20.

    (Its 9e-3 at NFE 50 was on a mixture whose parameters were not recorded; this one measures
    1.5e-2 there — see benchmarks/results/accuracy.md.)
    """
    sch, _, g_ref = reference
    for steps, bound in [(20, 8e-2)]:
        for mode in ("checkpoint", "adjoint"):
            _, g = _run(sch, "dpm3", steps, mode)
            assert _rel(g, g_ref) < bound, (steps, mode)


def test_adjoint_is_close_to_checkpoint_on_nonlinear_ode(reference):
    """The adjoint re-solves y backward; on the mixture it stays within the discretization error."""
    sch, _, g_ref = reference
    for steps in (20, 50):
        _, g_ck = _run(sch, "dpm3", steps, "checkpoint")
        _, g_adj = _run(sch, "dpm3", steps, "adjoint")
        assert _rel(g_adj, g_ck) < 2 * _rel(g_ck, g_ref) + 1e-6
        assert not math.isclose(_rel(g_adj, g_ck), 0.0, abs_tol=1e-12)  # genuinely re-solved
