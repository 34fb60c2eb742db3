"""VP noise schedules: ``x_t = α_t x_0 + σ_t ε`` with ``α_t² + σ_t² = 1``.

Everything derives from ``log α(t)``: ``σ = √(1 − α²)``, ``ρ = σ/α`` (the integration variable of
the reparameterized ODE, paper eq. 10) and ``λ = −log ρ`` (half the log-SNR). Functions accept
floats or tensors; grids and solver coefficients are computed in float64.
"""

from __future__ import annotations

import math

import torch

__all__ = ["VPSchedule"]


def _as_tensor(t) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t
    return torch.as_tensor(t, dtype=torch.float64)


class TimeRange:
    """``[t_min, t_max]``, the times a schedule is defined on (shared by every kind of path)."""

    t_min: float
    t_max: float

    def check_t(self, t: float, name: str) -> float:
        t = float(t)
        if not (self.t_min - 1e-9 <= t <= self.t_max + 1e-9) or math.isnan(t):
            raise ValueError(f"{name}={t} is outside the schedule's range [{self.t_min}, {self.t_max}]")
        return min(max(t, self.t_min), self.t_max)


class VPSchedule(TimeRange):
    """A variance-preserving schedule; build it with :meth:`linear` or :meth:`from_alphas_cumprod`."""

    path = "vp"  # the family of Gaussian paths (FlowSchedule: "rectified_flow")

    def __init__(self, *, kind: str, t_min: float, t_max: float, beta_min: float = 0.0,
                 beta_max: float = 0.0, log_alphas: torch.Tensor | None = None):
        if not t_max > t_min:
            raise ValueError(f"t_max ({t_max}) must exceed t_min ({t_min})")
        self.kind = kind
        self.t_min = float(t_min)
        self.t_max = float(t_max)
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)
        self._log_alphas = log_alphas  # discrete: log α at t = 0, 1, …, N−1 (float64)

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def linear(cls, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3,
               t_max: float = 1.0) -> "VPSchedule":
        """Continuous VP (score_sde): ``log α_t = −(β_max−β_min) t²/4 − β_min t/2``."""
        if beta_min < 0 or beta_max <= beta_min:
            raise ValueError("need 0 <= beta_min < beta_max")
        if not 0 < t_min < t_max:
            raise ValueError("need 0 < t_min < t_max")
        return cls(kind="linear", t_min=t_min, t_max=t_max, beta_min=beta_min, beta_max=beta_max)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod) -> "VPSchedule":
        """Discrete (diffusers/SD): ``α_n = √ᾱ_n`` at ``t = n ∈ [0, N−1]``, log α piecewise linear."""
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if ac.numel() < 2:
            raise ValueError("alphas_cumprod needs at least 2 entries")
        if not bool(((ac > 0) & (ac < 1)).all()):
            raise ValueError("alphas_cumprod must lie in (0, 1)")
        log_alphas = 0.5 * torch.log(ac)
        if not bool((log_alphas[1:] < log_alphas[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing")
        return cls(kind="discrete", t_min=0.0, t_max=float(ac.numel() - 1), log_alphas=log_alphas)

    @classmethod
    def from_betas(cls, betas) -> "VPSchedule":
        """Discrete schedule from per-step betas: ``ᾱ_n = Π_{i≤n}(1−β_i)``."""
        betas = torch.as_tensor(betas, dtype=torch.float64)
        return cls.from_alphas_cumprod(torch.cumprod(1.0 - betas, dim=0))

    # -- the schedule ---------------------------------------------------------------------------
    def log_alpha(self, t):
        t = _as_tensor(t)
        if self.kind == "linear":
            return -(self.beta_max - self.beta_min) * t * t / 4.0 - self.beta_min * t / 2.0
        la = self._log_alphas.to(t.device, t.dtype if t.is_floating_point() else torch.float64)
        tc = t.clamp(0.0, self.t_max)
        lo = tc.floor().clamp(max=self.t_max - 1).long()
        frac = tc - lo.to(tc.dtype)
        return la[lo] + frac * (la[lo + 1] - la[lo])

    def dlog_alpha_dt(self, t):
        """``f(t) = d log α/dt``, the drift of the original ODE (paper eq. 4)."""
        t = _as_tensor(t)
        if self.kind == "linear":
            return -(self.beta_max - self.beta_min) * t / 2.0 - self.beta_min / 2.0
        la = self._log_alphas.to(t.device, t.dtype if t.is_floating_point() else torch.float64)
        lo = t.clamp(0.0, self.t_max).floor().clamp(max=self.t_max - 1).long()
        return la[lo + 1] - la[lo]

    def alpha(self, t):
        return torch.exp(self.log_alpha(t))

    def alpha_from_rho(self, rho: float) -> float:
        """``α = 1/√(1+ρ²)`` (variance preserving)."""
        return 1.0 / math.sqrt(1.0 + rho * rho)

    def dalpha_dt(self, t):
        return self.alpha(t) * self.dlog_alpha_dt(t)

    def dsigma_dt(self, t):
        """``σ̇ = −α α̇/σ`` from ``α² + σ² = 1``."""
        return -self.alpha(t) * self.dalpha_dt(t) / self.sigma(t)

    def velocity_coefficients(self, t):
        """``(α̇, σ̇)`` w.r.t. t: a VP model's velocity would be ``dx/dt``."""
        return self.dalpha_dt(t), self.dsigma_dt(t)

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def rho(self, t):
        """``ρ_t = σ_t/α_t = exp(−λ_t)``."""
        return self.sigma(t) / self.alpha(t)

    def lambda_(self, t):
        """``λ_t = log(α_t/σ_t)``, half the log-SNR."""
        return -torch.log(self.rho(t))

    def t_from_log_alpha(self, log_alpha):
        la = _as_tensor(log_alpha)
        if self.kind == "linear":
            # Solve a t² + b t = c with a = (β_max−β_min)/4, b = β_min/2, c = −log α (stable root).
            a = (self.beta_max - self.beta_min) / 4.0
            b = self.beta_min / 2.0
            c = -la
            return 2.0 * c / (b + torch.sqrt(b * b + 4.0 * a * c))
        table = self._log_alphas.to(la.device, la.dtype if la.is_floating_point() else torch.float64)
        # log α is strictly decreasing in t: invert the piecewise-linear interpolation exactly.
        rev = torch.flip(table, [0])
        idx = torch.searchsorted(rev, la.clamp(rev[0], rev[-1]).contiguous(), right=True)
        idx = idx.clamp(1, rev.numel() - 1)
        x0, x1 = rev[idx - 1], rev[idx]
        n = rev.numel() - 1
        t1, t0 = (n - idx).to(la.dtype), (n - idx + 1).to(la.dtype)  # t at x1 and x0
        frac = (la.clamp(rev[0], rev[-1]) - x0) / (x1 - x0)
        return t0 + frac * (t1 - t0)

    def t_from_rho(self, rho):
        """Inverse of :meth:`rho`: ``α² = 1/(1+ρ²)``, then invert ``log α(t)``."""
        rho = _as_tensor(rho)
        return self.t_from_log_alpha(-0.5 * torch.log1p(rho * rho))

    def t_from_lambda(self, lam):
        lam = _as_tensor(lam)
        return self.t_from_log_alpha(-0.5 * torch.nn.functional.softplus(-2.0 * lam))

    def __repr__(self) -> str:
        if self.kind == "linear":
            return (f"VPSchedule.linear(beta_min={self.beta_min}, beta_max={self.beta_max}, "
                    f"t_min={self.t_min}, t_max={self.t_max})")
        return f"VPSchedule.from_alphas_cumprod(<{int(self.t_max) + 1} steps>)"
