"""The flow-matching path (rectified flow, SD3's shift) through the same core as VP.

Data ``N(μ + c, s² I)``, d=64, float64, ``FlowSchedule.rectified(shift=3)`` from t=0.999 to
t=1e-3, a *velocity* model (the oracle's ``u = dx/dσ``), loss ``Σ v·x_0``. The closed form
``y(ρ) = μ + (y_T−μ)√(s²+ρ²)/√(s²+ρ_T²)`` holds on any Gaussian path (``y = x/α``, ``ρ = σ/α``).
Tolerances: relative L2 errors, 1.5× what this setting measured when the table was written, per
steps (10, 20, 50, 100). Columns: x_0, ∂/∂x_T, ∂/∂cond, ∂/∂means, ∂/∂scale.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from adjointdpm_server.core import (PREDICTIONS, SOLVERS, FlowSchedule, GaussianMixture, VPSchedule,
                                    gaussian_solution, sample, sample_torchdiffeq, time_grid)

from ._closed_form import exact, problem, rel

STEPS = (10, 20, 50, 100)
TOLERANCES = {
    ('checkpoint', 'euler'): [(0.17, 0.44, 7.4e-05, 7.4e-05, 0.43), (0.089, 0.24, 4e-05, 4e-05, 0.24), (0.038, 0.11, 1.7e-05, 1.7e-05, 0.11), (0.019, 0.051, 8.5e-06, 8.5e-06, 0.051)],
    ('checkpoint', 'dpm2'): [(0.077, 0.21, 3.5e-05, 3.5e-05, 0.19), (0.024, 0.063, 1.1e-05, 1.1e-05, 0.063), (0.0042, 0.012, 1.9e-06, 1.9e-06, 0.012), (0.0011, 0.0029, 4.9e-07, 4.9e-07, 0.0029)],
    ('checkpoint', 'dpm3'): [(0.033, 0.088, 1.5e-05, 1.5e-05, 0.068), (0.004, 0.011, 1.8e-06, 1.8e-06, 0.011), (0.00015, 0.00039, 6.5e-08, 6.5e-08, 0.00039), (9.7e-06, 2.7e-05, 4.4e-09, 4.4e-09, 2.7e-05)],
    ('checkpoint', 'dpmpp2'): [(0.084, 0.23, 3.8e-05, 3.8e-05, 0.28), (0.029, 0.079, 1.3e-05, 1.3e-05, 0.079), (0.0046, 0.012, 2.1e-06, 2.1e-06, 0.013), (0.0011, 0.0031, 5.1e-07, 5.1e-07, 0.0031)],
    ('checkpoint', 'dpmpp3'): [(0.1, 0.28, 4.7e-05, 4.7e-05, 0.22), (0.0061, 0.016, 2.7e-06, 2.7e-06, 0.019), (0.00017, 0.00046, 7.7e-08, 7.7e-08, 0.00046), (1.1e-05, 2.8e-05, 4.7e-09, 4.7e-09, 2.8e-05)],
    ('checkpoint', 'ab2'): [(0.14, 0.37, 6.1e-05, 6.1e-05, 0.35), (0.051, 0.14, 2.3e-05, 2.3e-05, 0.14), (0.011, 0.029, 4.9e-06, 4.9e-06, 0.029), (0.003, 0.0081, 1.4e-06, 1.4e-06, 0.0081)],
    ('checkpoint', 'ab3'): [(0.13, 0.35, 5.8e-05, 5.8e-05, 0.33), (0.04, 0.11, 1.8e-05, 1.8e-05, 0.11), (0.0049, 0.013, 2.2e-06, 2.2e-06, 0.013), (0.00077, 0.0021, 3.5e-07, 3.5e-07, 0.0021)],
    ('checkpoint', 'ab4'): [(0.13, 0.34, 5.7e-05, 5.7e-05, 0.33), (0.035, 0.094, 1.6e-05, 1.6e-05, 0.094), (0.0028, 0.0075, 1.3e-06, 1.3e-06, 0.0075), (0.00027, 0.00071, 1.2e-07, 1.2e-07, 0.00071)],
    ('checkpoint', 'heun'): [(0.2, 0.52, 8.7e-05, 8.7e-05, 0.54), (0.041, 0.11, 1.8e-05, 1.8e-05, 0.11), (0.0058, 0.016, 2.6e-06, 2.6e-06, 0.016), (0.0014, 0.0038, 6.2e-07, 6.2e-07, 0.0038)],
    ('checkpoint', 'dopri5'): [(1.3e-05, 3.5e-05, 5.8e-09, 5.8e-09, 8.9e-05), (6.9e-07, 1.9e-06, 3.1e-10, 3.1e-10, 2e-06), (3e-09, 7.9e-09, 1.4e-12, 1.4e-12, 7.9e-09), (1.7e-11, 4.5e-11, 1.2e-14, 1.2e-14, 4.5e-11)],
    ('adjoint', 'euler'): [(0.17, 0.44, 7.4e-05, 7.4e-05, 0.8), (0.089, 0.24, 4e-05, 4e-05, 0.46), (0.038, 0.11, 1.7e-05, 1.7e-05, 0.2), (0.019, 0.051, 8.5e-06, 8.5e-06, 0.11)],
    ('adjoint', 'dpm2'): [(0.077, 0.21, 3.5e-05, 3.5e-05, 0.36), (0.024, 0.063, 1.1e-05, 1.1e-05, 0.09), (0.0042, 0.012, 1.9e-06, 1.9e-06, 0.014), (0.0011, 0.0029, 4.9e-07, 4.9e-07, 0.0032)],
    ('adjoint', 'dpm3'): [(0.033, 0.088, 1.5e-05, 1.5e-05, 0.093), (0.004, 0.011, 1.8e-06, 1.8e-06, 0.014), (0.00015, 0.00039, 6.5e-08, 6.5e-08, 0.0024), (9.7e-06, 2.7e-05, 4.4e-09, 4.4e-09, 0.00034)],
    ('adjoint', 'dpmpp2'): [(0.084, 0.23, 3.8e-05, 3.8e-05, 0.41), (0.029, 0.079, 1.3e-05, 1.3e-05, 0.12), (0.0046, 0.012, 2.1e-06, 2.1e-06, 0.016), (0.0011, 0.0031, 5.1e-07, 5.1e-07, 0.0035)],
    ('adjoint', 'dpmpp3'): [(0.1, 0.28, 4.7e-05, 4.7e-05, 0.38), (0.0061, 0.016, 2.7e-06, 2.7e-06, 0.0002), (0.00017, 0.00046, 7.7e-08, 7.7e-08, 0.0022), (1.1e-05, 2.8e-05, 4.7e-09, 4.7e-09, 0.00033)],
    ('adjoint', 'ab2'): [(0.14, 0.37, 6.1e-05, 6.1e-05, 0.31), (0.051, 0.14, 2.3e-05, 2.3e-05, 0.12), (0.011, 0.029, 4.9e-06, 4.9e-06, 0.028), (0.003, 0.0081, 1.4e-06, 1.4e-06, 0.0078)],
    ('adjoint', 'ab3'): [(0.13, 0.35, 5.8e-05, 5.8e-05, 0.77), (0.04, 0.11, 1.8e-05, 1.8e-05, 0.22), (0.0049, 0.013, 2.2e-06, 2.2e-06, 0.022), (0.00077, 0.0021, 3.5e-07, 3.5e-07, 0.0032)],
    ('adjoint', 'ab4'): [(0.13, 0.34, 5.7e-05, 5.7e-05, 0.041), (0.035, 0.094, 1.6e-05, 1.6e-05, 0.068), (0.0028, 0.0075, 1.3e-06, 1.3e-06, 0.0069), (0.00027, 0.00071, 1.2e-07, 1.2e-07, 0.00068)],
    ('adjoint', 'heun'): [(0.2, 0.52, 8.7e-05, 8.7e-05, 0.67), (0.041, 0.11, 1.8e-05, 1.8e-05, 0.12), (0.0058, 0.016, 2.6e-06, 2.6e-06, 0.016), (0.0014, 0.0038, 6.2e-07, 6.2e-07, 0.0038)],
    ('adjoint', 'dopri5'): [(1.3e-05, 3.5e-05, 5.8e-09, 5.8e-09, 0.00011), (6.9e-07, 1.9e-06, 3.1e-10, 3.1e-10, 1.4e-06), (3e-09, 7.9e-09, 1.4e-12, 1.4e-12, 5.9e-09), (1.7e-11, 4.5e-11, 1.2e-14, 1.2e-14, 4.9e-13)],
}


_problem, _rel = problem, rel


@pytest.fixture(scope="module")
def reference():
    return exact(FlowSchedule.rectified(shift=3.0))


def _solve(sch, solver, steps, mode, prediction="velocity"):
    mu, s, x_T, v, cond = _problem()
    model = GaussianMixture(sch, mu, torch.tensor([s]), prediction=prediction)
    x, c = x_T.clone().requires_grad_(), cond.clone().requires_grad_()
    x0 = sample(model, x, c, schedule=sch, steps=steps, solver=solver, grad_mode=mode, prediction=prediction)
    grads = torch.autograd.grad((x0 * v).sum(), [x, c, model.means, model.scales])
    return x0.detach(), grads


@pytest.mark.parametrize("mode", ["checkpoint", "adjoint"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_flow_every_solver_within_tolerance(reference, solver, mode):
    sch, x0_ref, g_ref = reference
    for steps, tol in zip(STEPS, TOLERANCES[mode, solver]):
        x0, grads = _solve(sch, solver, steps, mode)
        errors = [_rel(x0, x0_ref)] + [_rel(g.reshape(r.shape), r) for g, r in zip(grads, g_ref)]
        for name, err, bound in zip(("x_0", "dx_T", "dcond", "dmeans", "dscale"), errors, tol):
            assert err <= bound, f"{solver}/{mode} at {steps} steps: {name} error {err:.3g} > {bound:.3g}"
        if max(tol[1:]) >= 0.5:  # where a zero (error 1) or flipped (2) gradient could pass: direction
            for name, g, r in zip(("dx_T", "dcond", "dmeans", "dscale"), grads, g_ref):
                cos = float(torch.nn.functional.cosine_similarity(g.flatten(), r.reshape(g.shape).flatten(), dim=0))
                assert cos >= 0.99, f"{solver}/{mode} at {steps} steps: {name} points elsewhere (cos {cos:.3f})"


def test_flow_dpm3_converges_at_its_order(reference):
    """Error(10)/error(100) of dpm3 on the flow path: measured 3400 (x_0); third order."""
    sch, x0_ref, g_ref = reference
    coarse, _ = _solve(sch, "dpm3", 10, "checkpoint")
    fine, _ = _solve(sch, "dpm3", 100, "checkpoint")
    assert _rel(fine, x0_ref) * 1000 < _rel(coarse, x0_ref)


@pytest.mark.parametrize("solver", SOLVERS)
def test_checkpoint_equals_backprop_with_a_velocity_model(solver):
    """The exact gradient of the discrete sampler, weights included, for a flow model."""
    sch = FlowSchedule.rectified(shift=2.0)
    got = {}
    for mode in ("backprop", "checkpoint"):
        mu, s, x_T, v, cond = _problem()
        model = GaussianMixture(sch, mu[:, :8].repeat(2, 1) * torch.tensor([[1.0], [-1.0]], dtype=torch.float64),
                                torch.tensor([0.4, 0.7]), prediction="velocity")
        x, c = x_T[:, :8].clone().requires_grad_(), cond[:, :8].clone().requires_grad_()
        x0 = sample(model, x, c, schedule=sch, steps=6, solver=solver, grad_mode=mode, prediction="velocity",
                    guidance_scale=1.5, uncond=torch.zeros(4, 8, dtype=torch.float64))
        got[mode] = [x0.detach()] + list(torch.autograd.grad((x0 * v[:, :8]).sum(),
                                                             [x, c, model.means, model.scales, model.log_weights]))
    for name, a, b in zip(("x_0", "x_T", "cond", "means", "scales", "log_weights"), got["backprop"], got["checkpoint"]):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=f"{solver}: {name}")


@pytest.mark.parametrize("schedule", [VPSchedule.linear(), FlowSchedule.rectified(shift=3.0)], ids=["vp", "flow"])
@pytest.mark.parametrize("prediction", PREDICTIONS[1:])
def test_every_prediction_target_samples_and_differentiates_as_epsilon(schedule, prediction):
    """The same optimal model predicting v, velocity or x_0 gives the ε model's x_0 and gradients,
    with CFG (the conversion is affine, so it commutes with the guidance combination)."""
    out = {}
    for pred in ("epsilon", prediction):
        mu, s, x_T, v, cond = _problem()
        model = GaussianMixture(schedule, mu.repeat(2, 1) * torch.tensor([[1.0], [0.5]], dtype=torch.float64),
                                torch.tensor([0.5, 0.8]), prediction=pred)
        x, c = x_T.clone().requires_grad_(), cond.clone().requires_grad_()
        x0 = sample(model, x, c, schedule=schedule, steps=8, solver="dpm3", prediction=pred, guidance_scale=2.0,
                    uncond=torch.zeros_like(cond))
        out[pred] = [x0.detach()] + list(torch.autograd.grad((x0 * v).sum(), [x, c, model.means, model.scales]))
    for a, b in zip(out["epsilon"], out[prediction]):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)


def _one_gaussian(schedule, prediction):
    mu, s, x_T, _, _ = _problem()
    return mu, s, x_T, GaussianMixture(schedule, mu, torch.tensor([s]), prediction=prediction)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_the_oracle_velocity_is_dx_dsigma_of_the_exact_flow(shift):
    """Independent of the ε conversion: differentiate the closed-form trajectory x(σ) in σ."""
    sch = FlowSchedule.rectified(shift=shift)
    mu, s, x_T, model = _one_gaussian(sch, "velocity")
    for t in (0.2, 0.5, 0.9):
        sig, h = float(sch.sigma(t)), 1e-5
        x_at = lambda sg: gaussian_solution(sch, x_T, mu[0], s, t_end=float(sch.t_from_sigma(sg)))
        fd = (x_at(sig + h) - x_at(sig - h)) / (2 * h)
        with torch.no_grad():
            u = model(x_at(sig), torch.full((4,), t, dtype=torch.float64))
        assert _rel(u, fd) < 1e-8, t


def test_the_oracle_v_and_x0_targets_follow_their_definitions():
    """``x_0``: the posterior mean of a Gaussian, μ + α s²/(α²s² + σ²)·(x − αμ); ``v = α ε − σ x̂_0``."""
    sch = VPSchedule.linear()
    mu, s, x_T, eps_model = _one_gaussian(sch, "epsilon")
    t = torch.full((4,), 0.4, dtype=torch.float64)
    a, sg = float(sch.alpha(0.4)), float(sch.sigma(0.4))
    with torch.no_grad():
        x0_hat = mu + a * s * s / (a * a * s * s + sg * sg) * (x_T - a * mu)
        eps = eps_model(x_T, t)
        torch.testing.assert_close(_one_gaussian(sch, "sample")[3](x_T, t), x0_hat, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(_one_gaussian(sch, "v")[3](x_T, t), a * eps - sg * x0_hat, rtol=1e-12, atol=1e-12)


def test_euler_on_the_flow_path_is_diffusers_flow_match_euler():
    """DDIM (Euler in ρ) on a linear path is Euler in σ on the velocity: the same states as
    diffusers' FlowMatchEulerDiscreteScheduler on the same (shifted) sigmas, down to σ = 0."""
    sch = FlowSchedule.rectified(shift=3.0, t_min=0.0)
    mu, s, x_T, model = _one_gaussian(sch, "velocity")
    ts = list(np.linspace(0.999, 1 / 12, 12))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=ts)
    assert torch.allclose(scheduler.sigmas.double()[:-1], sch.sigma(torch.tensor(ts, dtype=torch.float64)), rtol=1e-6)
    x = x_T.clone()
    with torch.no_grad():
        for k, timestep in enumerate(scheduler.timesteps):
            t = sch.t_from_sigma(scheduler.sigmas[k].double())
            x = scheduler.step(model(x, t.expand(4)), timestep, x).prev_sample.double()
        ours = sample(model, x_T, schedule=sch, steps=None, timesteps=ts + [0.0], solver="euler",
                      prediction="velocity", grad_mode="none")
    assert _rel(ours, x) < 1e-6  # diffusers steps in float32


@pytest.mark.parametrize("solver", SOLVERS)
def test_every_solver_steps_into_the_clean_end(solver):
    """t = 0 (σ = 0, ρ = 0, λ = ∞): the λ-polynomial solvers take a first-order last step, the
    adjoint re-solves out of it; x_0 and ∂/∂x_T stay finite and near the closed form."""
    sch = FlowSchedule.rectified(shift=3.0, t_min=0.0)
    mu, s, x_T, model = _one_gaussian(sch, "velocity")
    leaf = x_T.clone().requires_grad_()
    ref = gaussian_solution(sch, leaf, mu[0], s, t_start=0.999, t_end=0.0)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), leaf)
    ts = time_grid(sch, 40, "time", 0.999, 0.0)
    assert float(ts[-1]) == 0.0
    for mode in ("checkpoint", "adjoint"):
        leaf = x_T.clone().requires_grad_()
        x0 = sample(model, leaf, schedule=sch, steps=None, timesteps=ts.tolist(), solver=solver, grad_mode=mode,
                    prediction="velocity")
        (g,) = torch.autograd.grad(x0.square().sum(), leaf)
        assert _rel(x0.detach(), ref.detach()) < 0.05, (solver, mode)
        assert _rel(g, g_ref) < 0.1, (solver, mode)


def test_logsnr_grid_cannot_reach_the_clean_end():
    sch = FlowSchedule.rectified(t_min=0.0)
    with pytest.raises(ValueError, match="logsnr"):
        time_grid(sch, 10, "logsnr")


def test_the_original_ode_baseline_holds_on_the_flow_path():
    """torchdiffeq on paper eq. 4 in its general-path form ``dx/dt = (α̇/α)x + (σ̇ − σα̇/α)ε``."""
    sch = FlowSchedule.rectified(shift=3.0)
    mu, s, x_T, model = _one_gaussian(sch, "velocity")
    ref = gaussian_solution(sch, x_T, mu[0], s)
    with torch.no_grad():
        out = sample_torchdiffeq(model, x_T, schedule=sch, ode="original", grad_mode="none",
                                 prediction="velocity", rtol=1e-8, atol=1e-8)
    assert _rel(out, ref) < 1e-5


def test_flow_schedule_closed_forms():
    sch = FlowSchedule.rectified(shift=3.0, t_min=1e-3, t_max=0.999)
    t = torch.linspace(1e-3, 0.999, 501, dtype=torch.float64)
    sig = 3.0 * t / (1 + 2.0 * t)
    torch.testing.assert_close(sch.sigma(t), sig, rtol=1e-15, atol=0)
    torch.testing.assert_close(sch.alpha(t) + sch.sigma(t), torch.ones_like(t), rtol=0, atol=1e-15)
    torch.testing.assert_close(sch.rho(t), sig / (1 - sig), rtol=1e-13, atol=0)
    torch.testing.assert_close(sch.lambda_(t), torch.log((1 - sig) / sig), rtol=1e-12, atol=1e-13)
    for inverse, forward in ((sch.t_from_rho, sch.rho), (sch.t_from_lambda, sch.lambda_), (sch.t_from_sigma, sch.sigma)):
        torch.testing.assert_close(inverse(forward(t)), t, rtol=0, atol=1e-12)
    h = 1e-6
    torch.testing.assert_close(sch.dsigma_dt(t[1:-1]), (sch.sigma(t[1:-1] + h) - sch.sigma(t[1:-1] - h)) / (2 * h),
                               rtol=1e-7, atol=0)
    torch.testing.assert_close(sch.dlog_alpha_dt(t[1:-1]),
                               (sch.log_alpha(t[1:-1] + h) - sch.log_alpha(t[1:-1] - h)) / (2 * h), rtol=1e-6, atol=0)
    for r in (1e-3, 0.5, 30.0):
        assert math.isclose(sch.alpha_from_rho(r), float(sch.alpha(sch.t_from_rho(torch.tensor(r, dtype=torch.float64)))),
                            rel_tol=1e-12)
    assert sch.check_t(0.999 + 1e-12, "t") == 0.999
    with pytest.raises(ValueError, match="outside"):
        sch.check_t(1.0, "t_start")


@pytest.mark.parametrize("kwargs", [dict(t_max=1.0), dict(t_min=-0.1), dict(shift=0.0), dict(shift=float("nan")),
                                    dict(t_min=0.5, t_max=0.4)])
def test_flow_schedule_refuses_what_it_cannot_solve(kwargs):
    with pytest.raises(ValueError):
        FlowSchedule.rectified(**kwargs)


def test_vp_velocity_coefficients_are_the_time_derivatives():
    sch = VPSchedule.linear()
    t, h = torch.linspace(0.05, 0.95, 19, dtype=torch.float64), 1e-6
    da, ds = sch.velocity_coefficients(t)
    torch.testing.assert_close(da, (sch.alpha(t + h) - sch.alpha(t - h)) / (2 * h), rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(ds, (sch.sigma(t + h) - sch.sigma(t - h)) / (2 * h), rtol=1e-7, atol=1e-10)


def test_an_unknown_prediction_is_refused():
    sch = FlowSchedule.rectified()
    with pytest.raises(ValueError, match="prediction"):
        sample(lambda x, t, c: x, torch.zeros(1, 2), schedule=sch, steps=2, prediction="noise")
