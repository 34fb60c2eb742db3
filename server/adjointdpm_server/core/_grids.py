"""Time grids ``t_0 = t_start > t_1 > … > t_N = t_end`` for fixed-step solvers (float64).

``logsnr`` is uniform in λ = −log ρ (DPM-Solver's choice, and ours by default: a grid uniform in ρ
is 10–100× less accurate); ``time`` is uniform in t; ``karras`` is EDM's ρ-power grid
(Karras et al. 2022, eq. 5, with the VE "σ" being our ρ and exponent 7).
"""

from __future__ import annotations

import torch

from ._flow_schedule import Schedule

__all__ = ["GRIDS", "time_grid"]

GRIDS = ("logsnr", "time", "karras")


def time_grid(schedule: Schedule, steps: int, grid: str = "logsnr", t_start: float | None = None,
              t_end: float | None = None) -> torch.Tensor:
    """The ``steps + 1`` times of a grid, float64, decreasing, endpoints exact."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; choose one of {', '.join(GRIDS)}")
    t_start = schedule.t_max if t_start is None else t_start
    t_end = schedule.t_min if t_end is None else t_end
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    ends = torch.tensor([t_start, t_end], dtype=torch.float64)
    if grid == "time":
        ts = ends[0] + u * (ends[1] - ends[0])
    elif grid == "logsnr":
        lam = schedule.lambda_(ends)
        if not bool(torch.isfinite(lam).all()):
            raise ValueError(f"grid 'logsnr' cannot reach t={t_end} (σ = 0, λ = ∞); use grid 'time' "
                             "or 'karras', or explicit timesteps")
        ts = schedule.t_from_lambda(lam[0] + u * (lam[1] - lam[0]))
    else:
        r = schedule.rho(ends) ** (1.0 / 7.0)
        ts = schedule.t_from_rho((r[0] + u * (r[1] - r[0])) ** 7.0)
    ts[0], ts[-1] = ends[0], ends[1]
    return ts
