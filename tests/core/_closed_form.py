"""The single-Gaussian problem both oracle tables use (VP and flow paths alike)."""

import torch

from adjointdpm_server.core import gaussian_solution


def problem():
    """``(μ, s, x_T, v, cond)``: data N(μ + cond, s² I), d = 64, batch 4, float64, seed 0."""
    g = torch.Generator().manual_seed(0)
    d = 64
    mu = torch.randn(1, d, generator=g, dtype=torch.float64)
    x_T = torch.randn(4, d, generator=g, dtype=torch.float64)
    v = torch.randn(4, d, generator=g, dtype=torch.float64)
    cond = 0.3 * torch.randn(4, d, generator=g, dtype=torch.float64)
    return mu, 0.5, x_T, v, cond


def rel(a, b):
    return float((a - b).norm() / b.norm())


def exact(schedule):
    """The closed-form x_0 of :func:`problem` and its gradients (x_T, cond, μ, s) of ``Σ v·x_0``."""
    mu, s, x_T, v, cond = problem()
    leaves = [x_T.clone().requires_grad_(), cond.clone().requires_grad_(), mu.clone().requires_grad_(),
              torch.tensor(s, dtype=torch.float64, requires_grad=True)]
    x0 = gaussian_solution(schedule, leaves[0], leaves[2][0], leaves[3], cond=leaves[1])
    grads = torch.autograd.grad((x0 * v).sum(), leaves)
    return schedule, x0.detach(), grads
