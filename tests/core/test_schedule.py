"""Schedules and grids against closed forms and diffusers' own schedulers."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from adjointdpm_server.core import VPSchedule, time_grid


def test_linear_schedule_matches_closed_form():
    sch = VPSchedule.linear(beta_min=0.1, beta_max=20.0, t_min=1e-3)
    t = torch.linspace(1e-3, 1.0, 101, dtype=torch.float64)
    log_alpha = -(20.0 - 0.1) * t ** 2 / 4 - 0.1 * t / 2
    assert torch.allclose(sch.alpha(t), torch.exp(log_alpha), rtol=1e-14)
    assert torch.allclose(sch.alpha(t) ** 2 + sch.sigma(t) ** 2, torch.ones_like(t), atol=1e-14)
    assert torch.allclose(sch.rho(t), sch.sigma(t) / sch.alpha(t), rtol=1e-14)
    assert torch.allclose(sch.lambda_(t), torch.log(sch.alpha(t) / sch.sigma(t)), rtol=1e-12)
    assert (sch.t_min, sch.t_max) == (1e-3, 1.0)
    # f = d log α/dt against a central difference
    h = 1e-6
    fd = (sch.log_alpha(t + h) - sch.log_alpha(t - h)) / (2 * h)
    assert torch.allclose(sch.dlog_alpha_dt(t), fd, rtol=1e-7)


@pytest.mark.parametrize("kind", ["linear", "discrete"])
def test_t_from_rho_inverts_rho(kind):
    if kind == "linear":
        sch = VPSchedule.linear()
        t = torch.linspace(sch.t_min, sch.t_max, 997, dtype=torch.float64)
    else:
        sch = VPSchedule.from_alphas_cumprod(DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                           beta_end=0.012).alphas_cumprod)
        t = torch.linspace(0.0, 999.0, 2999, dtype=torch.float64)
    assert torch.allclose(sch.t_from_rho(sch.rho(t)), t, atol=1e-9)
    assert torch.allclose(sch.t_from_lambda(sch.lambda_(t)), t, atol=1e-9)


def test_discrete_schedule_matches_diffusers_alphas_cumprod():
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012)
    sch = VPSchedule.from_alphas_cumprod(sched.alphas_cumprod)
    n = torch.arange(1000, dtype=torch.float64)
    assert torch.allclose(sch.alpha(n) ** 2, sched.alphas_cumprod.to(torch.float64), rtol=1e-6)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # SD's scaled_linear
    assert torch.allclose(VPSchedule.from_betas(betas).alpha(n) ** 2, torch.cumprod(1 - betas, 0), rtol=1e-12)
    assert (sch.t_min, sch.t_max) == (0.0, 999.0)
    # log α is linear between integer timesteps
    mid = sch.log_alpha(torch.tensor(10.25, dtype=torch.float64))
    la = 0.5 * torch.log(sched.alphas_cumprod.to(torch.float64))
    assert math.isclose(float(mid), float(0.75 * la[10] + 0.25 * la[11]), rel_tol=1e-6)


@pytest.mark.parametrize("grid", ["logsnr", "time", "karras"])
def test_grids_are_decreasing_with_exact_endpoints(grid):
    sch = VPSchedule.linear()
    ts = time_grid(sch, 17, grid, t_start=0.9, t_end=0.01)
    assert ts.shape == (18,) and ts.dtype == torch.float64
    assert ts[0] == 0.9 and ts[-1] == 0.01
    assert bool((ts[1:] < ts[:-1]).all())


def test_grid_spacing():
    sch = VPSchedule.linear()
    lam = sch.lambda_(time_grid(sch, 10, "logsnr"))
    assert np.allclose(np.diff(lam.numpy()), float(lam[1] - lam[0]), rtol=1e-9)
    t = time_grid(sch, 10, "time")
    assert np.allclose(np.diff(t.numpy()), float(t[1] - t[0]), rtol=1e-9)
    r = sch.rho(time_grid(sch, 10, "karras")) ** (1 / 7)
    assert np.allclose(np.diff(r.numpy()), float(r[1] - r[0]), rtol=1e-8)


def test_bad_schedules_raise():
    with pytest.raises(ValueError):
        VPSchedule.linear(beta_min=1.0, beta_max=0.5)
    with pytest.raises(ValueError):
        VPSchedule.from_alphas_cumprod([0.9, 0.95])  # increasing
    with pytest.raises(ValueError):
        VPSchedule.from_alphas_cumprod([1.0, 0.5])  # α = 1 has ρ = 0
    with pytest.raises(ValueError):
        time_grid(VPSchedule.linear(), 5, "cosine")


@pytest.mark.parametrize("order,basis", [(2, "lambda"), (3, "lambda"), (3, "rho"), (4, "rho")])
def test_multistep_weights_are_the_exact_integrals(order, basis):
    """W[i][j] = ∫ L_j dρ over step i, the Lagrange basis through the last nodes in λ (DPM-Solver)
    or ρ (Adams–Bashforth), against scipy's adaptive quadrature (independent of the Gauss–Legendre
    rule inside): exact to 1e-10, on a 5-step grid where the steps are long."""
    from scipy.integrate import quad

    from adjointdpm_server.core._solvers import _multistep_weights

    sch = VPSchedule.linear()
    rhos = tuple(float(r) for r in sch.rho(time_grid(sch, 5, "logsnr")))
    weights = _multistep_weights(order, basis, rhos)
    for i in range(len(rhos) - 1):
        k = min(order, i + 1)
        if basis == "lambda":  # s = λ, dρ = −e^{−λ} dλ
            nodes, a, b, measure = [-math.log(rhos[i - j]) for j in range(k)], -math.log(rhos[i]), \
                -math.log(rhos[i + 1]), lambda s: -math.exp(-s)
        else:
            nodes, a, b, measure = [rhos[i - j] for j in range(k)], rhos[i], rhos[i + 1], lambda s: 1.0
        for j in range(k):
            def basis_j(s, j=j):
                return math.prod((s - nodes[m]) / (nodes[j] - nodes[m]) for m in range(k) if m != j)
            want = quad(lambda s: basis_j(s) * measure(s), a, b, epsabs=0, epsrel=1e-13, limit=200)[0]
            assert math.isclose(weights[i][j], want, rel_tol=1e-10, abs_tol=1e-13), (i, j)


@pytest.mark.parametrize("order", [2, 3])
def test_data_form_weights_are_the_exact_integrals(order):
    """DPM-Solver++ form: y_{i+1} = (ρ_{i+1}/ρ_i) y_i + Σ_j C_ij x̂_0,i−j with C_ij = ρ_{i+1} ∫ e^λ L_j dλ
    over step i (Lagrange basis in λ through the last nodes), checked term by term against scipy's
    adaptive quadrature: A_i0 = ρ_{i+1}/ρ_i − 1 + C_i0, A_ij = C_ij, W_ij = −ρ_{i−j} C_ij."""
    from scipy.integrate import quad

    from adjointdpm_server.core._solvers import _data_weights

    sch = VPSchedule.linear()
    rhos = tuple(float(r) for r in sch.rho(time_grid(sch, 5, "logsnr")))
    for i, (w, a) in enumerate(_data_weights(order, rhos)):
        k = min(order, i + 1)
        nodes = [-math.log(rhos[i - j]) for j in range(k)]
        lo, hi = -math.log(rhos[i]), -math.log(rhos[i + 1])
        for j in range(k):
            def basis_j(s, j=j):
                return math.prod((s - nodes[m]) / (nodes[j] - nodes[m]) for m in range(k) if m != j)
            c = rhos[i + 1] * quad(lambda s: basis_j(s) * math.exp(s), lo, hi, epsabs=0, epsrel=1e-13,
                                   limit=200)[0]
            want_a = c + (rhos[i + 1] / rhos[i] - 1.0 if j == 0 else 0.0)
            assert math.isclose(a[j], want_a, rel_tol=1e-10, abs_tol=1e-13), (i, j)
            assert math.isclose(w[j], -rhos[i - j] * c, rel_tol=1e-10, abs_tol=1e-13), (i, j)
