"""Flow-matching paths: ``x_t = α_t x_0 + σ_t ε`` with ``α_t = 1 − σ_t`` (rectified flow).

The reparameterized ODE ``dy/dρ = ε̃`` (paper eq. 10, ``y = x/α``, ``ρ = σ/α``) holds for any
Gaussian path, not only variance-preserving ones: ``y = x_0 + ρ ε`` and ``dy/dρ = E[ε | x]``. So a
flow model gets the same solvers, grids and gradients as a VP model once its velocity is turned
into ε (core/_prediction.py). Time runs ``t ∈ [t_min, t_max] ⊂ [0, 1)`` with ``t = 1`` the noise
end; SD3's time shift ``σ = shift·t / (1 + (shift − 1)·t)`` spends more of a grid at high noise.
"""

from __future__ import annotations

import math

import torch

from ._schedule import TimeRange, VPSchedule, _as_tensor

__all__ = ["FlowSchedule", "Schedule"]


class FlowSchedule(TimeRange):
    """A rectified-flow path (SD3, FLUX); build it with :meth:`rectified`."""

    path = "rectified_flow"

    def __init__(self, *, shift: float, t_min: float, t_max: float):
        if not (shift > 0 and math.isfinite(shift)):
            raise ValueError(f"shift must be a positive number; got {shift}")
        if not 0 <= t_min < t_max < 1:
            raise ValueError(f"need 0 <= t_min < t_max < 1; got t_min={t_min}, t_max={t_max}")
        self.shift, self.t_min, self.t_max = float(shift), float(t_min), float(t_max)

    @classmethod
    def rectified(cls, shift: float = 1.0, t_min: float = 1e-3, t_max: float = 0.999) -> "FlowSchedule":
        """``α = 1 − σ``, ``σ = shift·t/(1 + (shift − 1)·t)`` (SD3's shift; 1 is no shift).

        ``t_max < 1``: at ``t = 1`` (α = 0) ``y = x/α`` is undefined. ``t_min = 0`` is allowed: the
        clean end (σ = 0, ρ = 0) that flow samplers step into last; grids uniform in λ cannot reach
        it (λ = ∞), so solve to it with ``grid="time"``/``"karras"`` or explicit ``timesteps``."""
        return cls(shift=shift, t_min=t_min, t_max=t_max)

    # -- the path -------------------------------------------------------------------------------
    def sigma(self, t):
        """``σ_t``: the shifted time itself (what diffusers' flow schedulers call sigma)."""
        t = _as_tensor(t)
        return self.shift * t / (1.0 + (self.shift - 1.0) * t)

    def alpha(self, t):
        return 1.0 - self.sigma(t)

    def log_alpha(self, t):
        return torch.log1p(-self.sigma(t))

    def dsigma_dt(self, t):
        t = _as_tensor(t)
        return self.shift / (1.0 + (self.shift - 1.0) * t) ** 2

    def dalpha_dt(self, t):
        return -self.dsigma_dt(t)

    def dlog_alpha_dt(self, t):
        return self.dalpha_dt(t) / self.alpha(t)

    def velocity_coefficients(self, t):
        """``(dα/dσ, dσ/dσ) = (−1, 1)``: a flow model's velocity is ``dx/dσ = ε − x_0``."""
        return -1.0, 1.0

    def rho(self, t):
        """``ρ_t = σ_t/α_t``."""
        s = self.sigma(t)
        return s / (1.0 - s)

    def lambda_(self, t):
        """``λ_t = log(α_t/σ_t)``."""
        s = self.sigma(t)
        return torch.log1p(-s) - torch.log(s)

    def alpha_from_rho(self, rho: float) -> float:
        return 1.0 / (1.0 + rho)

    def t_from_sigma(self, sigma):
        """Inverse of the shift: ``t = σ/(shift − (shift − 1)·σ)``."""
        s = _as_tensor(sigma)
        return s / (self.shift - (self.shift - 1.0) * s)

    def t_from_rho(self, rho):
        rho = _as_tensor(rho)
        return self.t_from_sigma(rho / (1.0 + rho))

    def t_from_lambda(self, lam):
        return self.t_from_sigma(torch.sigmoid(-_as_tensor(lam)))

    def __repr__(self) -> str:
        return f"FlowSchedule.rectified(shift={self.shift}, t_min={self.t_min}, t_max={self.t_max})"


Schedule = VPSchedule | FlowSchedule  # what core functions accept as ``schedule``
