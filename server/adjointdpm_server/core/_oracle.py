"""The analytic oracle: the optimal noise predictor of an isotropic Gaussian mixture (docs/design.md §2).

For data ``Σ_k π_k N(μ_k + c, s_k² I)`` the marginal at t is ``Σ_k π_k N(α μ_k, (α² s_k² + σ²) I)``
and ``ε*(x, t) = σ Σ_k w_k(x) (x − α μ_k)/(α² s_k² + σ²)`` with posterior weights ``w_k``. For one
component the ODE ``dy/dρ = ρ(y−μ)/(s²+ρ²)`` is solved by
``y(ρ) = μ + (y_T−μ)·√(s²+ρ²)/√(s²+ρ_T²)`` — the closed form tests and benchmarks hold us to.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._flow_schedule import Schedule
from ._prediction import check_prediction, eps_coefficients

__all__ = ["GaussianMixture", "gaussian_solution"]


class GaussianMixture(nn.Module):
    """``ε*`` of an isotropic Gaussian mixture, with learnable means, scales and log-weights.

    ``cond`` (shape ``(B, *event_shape)``) is added to every mean, so gradients w.r.t. the
    conditioning exist in closed form too. ``prediction`` makes it the optimal v, velocity or
    x_0 predictor instead (the inverse of core/_prediction.py's map), on any path.
    """

    def __init__(self, schedule: Schedule, means: torch.Tensor, scales, weights=None,
                 prediction: str = "epsilon"):
        super().__init__()
        self.prediction = check_prediction(prediction)
        means = torch.as_tensor(means)
        if means.dim() < 2:
            raise ValueError("means must have shape (K, *event_shape)")
        k = means.shape[0]
        scales = torch.as_tensor(scales, dtype=means.dtype).expand(k).clone()
        weights = torch.full((k,), 1.0 / k, dtype=means.dtype) if weights is None else torch.as_tensor(
            weights, dtype=means.dtype)
        self.schedule = schedule
        self.means = nn.Parameter(means.clone())
        self.scales = nn.Parameter(scales)
        self.log_weights = nn.Parameter(torch.log(weights / weights.sum()))

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.means.shape[1:])

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None):
        batch, d = x.shape[0], self.means[0].numel()
        xf = x.reshape(batch, d)
        t64 = t.detach().to(torch.float64)
        alpha = self.schedule.alpha(t64).to(x.dtype).reshape(batch, 1, 1)
        sigma = self.schedule.sigma(t64).to(x.dtype).reshape(batch, 1)
        mu = self.means.reshape(1, -1, d)
        if cond is not None:
            mu = mu + cond.reshape(batch, 1, d)
        var = alpha.reshape(batch, 1) ** 2 * self.scales.reshape(1, -1) ** 2 + sigma ** 2  # (B, K)
        diff = xf.reshape(batch, 1, d) - alpha * mu  # (B, K, d)
        log_post = (torch.log_softmax(self.log_weights, 0) - 0.5 * d * torch.log(var)
                    - 0.5 * diff.pow(2).sum(-1) / var)
        post = torch.softmax(log_post, dim=1)
        eps = sigma * (post.unsqueeze(-1) * diff / var.unsqueeze(-1)).sum(1)
        if self.prediction != "epsilon":
            dalpha = dsigma = None
            if self.prediction == "velocity":
                dalpha, dsigma = (torch.as_tensor(v, dtype=torch.float64).expand(batch).to(x.dtype).reshape(batch, 1)
                                  for v in self.schedule.velocity_coefficients(t64))
            a, b = eps_coefficients(self.prediction, alpha.reshape(batch, 1), sigma, dalpha, dsigma)
            eps = (eps - b * xf) / a
        return eps.reshape(x.shape)


def gaussian_solution(schedule: Schedule, x_T: torch.Tensor, mean, scale, *, cond=None,
                      t_start: float | None = None, t_end: float | None = None) -> torch.Tensor:
    """The exact ``x_0`` of the probability-flow ODE for data ``N(mean + cond, scale² I)``."""
    t_start = schedule.t_max if t_start is None else t_start
    t_end = schedule.t_min if t_end is None else t_end
    a_T, a_0 = float(schedule.alpha(t_start)), float(schedule.alpha(t_end))
    r_T, r_0 = float(schedule.rho(t_start)), float(schedule.rho(t_end))
    mu = mean if cond is None else mean + cond
    s2 = scale * scale if isinstance(scale, torch.Tensor) else float(scale) ** 2
    ratio = torch.sqrt((s2 + r_0 ** 2) / (s2 + r_T ** 2)) if isinstance(s2, torch.Tensor) else \
        math.sqrt((s2 + r_0 ** 2) / (s2 + r_T ** 2))
    return a_0 * (mu + (x_T / a_T - mu) * ratio)
