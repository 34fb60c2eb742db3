"""Baselines through torchdiffeq: the original ODE (paper eq. 4) and eq. 10 with its adjoint.

``original``: ``dx/dt = f(t)·x + g(t)²/(2σ_t)·ε̃`` with ``f = d log α/dt``, ``g² = dσ²/dt − 2fσ²``
(= −2f for VP), i.e. ``dx/dt = (α̇/α)·x + (σ̇ − σ α̇/α)·ε̃`` on any Gaussian path — stiff near t → 0. ``reparameterized``: ``dy/dρ = ε̃`` (eq. 10). Gradients by
``torchdiffeq.odeint_adjoint`` (the paper's continuous adjoint, eq. 11, solved by the same method)
or by backprop through ``odeint``. Kept for benchmarks; use :func:`sample` for real work.
"""

from __future__ import annotations


import torch

from ._field import GuidedEps, Node, node_at_rho
from ._grids import time_grid
from ._flow_schedule import Schedule

__all__ = ["sample_torchdiffeq"]

_FIXED = ("euler", "midpoint", "rk4", "explicit_adams", "implicit_adams")


class _Rhs(torch.nn.Module):
    def __init__(self, field: GuidedEps, schedule: Schedule, ode: str, cond, uncond):
        super().__init__()
        self.field, self.schedule, self.ode = field, schedule, ode
        self.cond, self.uncond = cond, uncond

    def forward(self, s, state):
        s = float(s.detach())
        if self.ode == "reparameterized":
            return self.field(state, node_at_rho(self.schedule, s), self.cond, self.uncond)
        t64 = torch.tensor(s, dtype=torch.float64)
        alpha, sigma = float(self.schedule.alpha(t64)), float(self.schedule.sigma(t64))
        f = float(self.schedule.dalpha_dt(t64)) / alpha
        g2_over_2sigma = float(self.schedule.dsigma_dt(t64)) - sigma * f  # g²/(2σ)
        eps = self.field(state / alpha, Node(s, sigma / alpha, alpha), self.cond, self.uncond)
        return f * state + g2_over_2sigma * eps


def sample_torchdiffeq(eps_fn, x_T: torch.Tensor, cond=None, *, schedule: Schedule,
                       ode: str = "original", method: str = "dopri5", steps: int | None = None,
                       grad_mode: str = "adjoint", guidance_scale: float | None = None,
                       uncond=None, grid: str = "logsnr", rtol: float = 1e-5, atol: float = 1e-5,
                       t_start: float | None = None, t_end: float | None = None,
                       prediction: str = "epsilon") -> torch.Tensor:
    """Solve eq. 4 (``original``) or eq. 10 (``reparameterized``) with torchdiffeq."""
    from torchdiffeq import odeint, odeint_adjoint

    if ode not in ("original", "reparameterized"):
        raise ValueError("ode must be 'original' or 'reparameterized'")
    if grad_mode not in ("adjoint", "backprop", "none"):
        raise ValueError("grad_mode must be 'adjoint', 'backprop' or 'none'")
    fixed = method in _FIXED
    if fixed and (steps is None or steps < 1):
        raise ValueError(f"method {method!r} needs steps >= 1")
    ts = time_grid(schedule, steps or 1, grid, t_start, t_end)
    field = GuidedEps(eps_fn, guidance_scale, prediction=prediction, schedule=schedule)
    rhs = _Rhs(field, schedule, ode, cond, uncond)
    if ode == "original":
        grid_pts, state = ts, x_T
    else:
        grid_pts, state = schedule.rho(ts), x_T / float(schedule.alpha(ts[0]))
    span = torch.tensor([float(grid_pts[0]), float(grid_pts[-1])], dtype=x_T.dtype, device=x_T.device)
    kwargs = dict(method=method, rtol=rtol, atol=atol)
    # torchdiffeq runs a decreasing span negated; the adjoint solve of odeint_adjoint runs the
    # reversed span in those negated coordinates, hence the signs of its options below.
    if fixed:
        pts = grid_pts.to(dtype=x_T.dtype, device=x_T.device)
        kwargs["options"] = dict(grid_constructor=lambda f, y0, t: pts)
        adjoint_options = dict(grid_constructor=lambda f, y0, t: -pts.flip(0))
    else:
        # land on the end point (eq. 4 is undefined past t_min = 0 of a discrete schedule or
        # below t = 0), and fix the first step so that no step-size term leaks into gradients
        first = abs(float(span[1] - span[0])) / 16.0
        kwargs["options"] = dict(step_t=span[1:], first_step=first)
        adjoint_options = dict(step_t=-span[:1], first_step=first)
    if grad_mode == "adjoint" and torch.is_grad_enabled():
        theta = list(eps_fn.parameters()) if isinstance(eps_fn, torch.nn.Module) else []
        theta += [c for c in (cond, uncond) if isinstance(c, torch.Tensor) and c.requires_grad]
        theta = tuple(p for p in theta if p.requires_grad)
        out = odeint_adjoint(rhs, state, span, adjoint_params=theta, adjoint_options=adjoint_options,
                             **kwargs)[-1]
    elif grad_mode == "none":
        with torch.no_grad():
            out = odeint(rhs, state, span, **kwargs)[-1]
    else:
        out = odeint(rhs, state, span, **kwargs)[-1]
    rhs.nfe = field.nfe
    end_alpha = 1.0 if ode == "original" else float(schedule.alpha(ts[-1]))
    return out * end_alpha
