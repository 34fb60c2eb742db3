"""The torchdiffeq baselines (original ODE eq. 4, reparameterized eq. 10) against the closed form."""

import pytest
import torch

from adjointdpm_server.core import GaussianMixture, VPSchedule, gaussian_solution, sample_torchdiffeq


@pytest.mark.parametrize("ode", ["original", "reparameterized"])
@pytest.mark.parametrize("grad_mode", ["adjoint", "backprop"])
def test_torchdiffeq_baselines_solve_the_same_flow(ode, grad_mode):
    sch = VPSchedule.linear()
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(1, 16, generator=g, dtype=torch.float64)
    x_T = torch.randn(3, 16, generator=g, dtype=torch.float64)
    v = torch.randn(3, 16, generator=g, dtype=torch.float64)
    leaf = x_T.clone().requires_grad_()
    ref = gaussian_solution(sch, leaf, mu[0], 0.5)
    (g_ref,) = torch.autograd.grad((ref * v).sum(), leaf)
    model = GaussianMixture(sch, mu, [0.5]).to(torch.float64)
    leaf = x_T.clone().requires_grad_()
    x0 = sample_torchdiffeq(model, leaf, schedule=sch, ode=ode, method="dopri5", rtol=1e-9, atol=1e-9,
                            grad_mode=grad_mode)
    (g,) = torch.autograd.grad((x0 * v).sum(), leaf)
    ref = ref.detach()
    assert float((x0.detach() - ref).norm() / ref.norm()) < 1e-7
    assert float((g - g_ref).norm() / g_ref.norm()) < 1e-7


@pytest.mark.parametrize("ode", ["original", "reparameterized"])
def test_fixed_step_adjoint_converges(ode):
    """odeint_adjoint on a fixed grid: the backward solve walks the same grid in reverse."""
    sch = VPSchedule.linear()
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(1, 16, generator=g, dtype=torch.float64)
    x_T = torch.randn(3, 16, generator=g, dtype=torch.float64)
    model = GaussianMixture(sch, mu, [0.5]).to(torch.float64).requires_grad_(False)
    leaf = x_T.clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(gaussian_solution(sch, leaf, mu[0], 0.5).sum(), leaf)
    errs = []
    for steps in (50, 400):
        leaf = x_T.clone().requires_grad_()
        x0 = sample_torchdiffeq(model, leaf, schedule=sch, ode=ode, method="rk4", steps=steps)
        (grad,) = torch.autograd.grad(x0.sum(), leaf)
        errs.append(float((grad - g_ref).norm() / g_ref.norm()))
    assert errs[1] < 1e-6 and errs[1] < errs[0] / 50, errs
