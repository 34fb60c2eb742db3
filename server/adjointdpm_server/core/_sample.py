"""``sample``: solve the probability-flow ODE from ``x_T`` to ``x_0``, differentiably (docs/design.md §4)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ._field import GuidedEps, nodes_from_times
from ._gradients import SolveFunction
from ._grids import GRIDS, time_grid
from ._memory import MemoryPlan, RankedAnchors, default_budget, plan_anchors
from ._flow_schedule import Schedule
from ._prediction import check_prediction
from ._solvers import get_solver

__all__ = ["sample", "Progress", "GRAD_MODES"]

GRAD_MODES = ("auto", "checkpoint", "adjoint", "backprop", "none")


@dataclass(frozen=True)
class Progress:
    """What ``callback`` receives after each step: phase ``forward`` or ``backward``."""

    phase: str
    step: int
    total: int
    t: float
    nfe: int


@dataclass
class _Solve:
    solver: object
    field: GuidedEps
    nodes: list
    mode: str
    callback: Callable | None
    memory_budget: float = 0.0  # auto: bytes for kept graphs and stored states
    anchors: int = 0  # adjoint: how many exact states to keep (0: y_N only)
    truncate: int = 0  # the last steps the gradient flows through (all: the exact gradient)
    report: Callable[[MemoryPlan], None] | None = None  # receives the plan once it is made

    @property
    def first(self) -> int:
        """The first step with a gradient."""
        return len(self.nodes) - 1 - self.truncate

    def network_tensors(self) -> list[torch.Tensor]:
        """Weights and buffers of the network: saved by its graph, but not memory the graph adds."""
        module = self.field.eps_fn
        if not isinstance(module, torch.nn.Module):
            return []
        return list(module.parameters()) + list(module.buffers())

    def storage(self):
        """``(store, ranked)`` for the forward solve, ``store`` the indices of the states it keeps:
        every state (``auto``, ``checkpoint``, an ``adjoint`` budget that holds them all), the
        ``adjoint``'s ranked anchors (multistep), or evenly spaced ones (one-step solvers: the anchors split y_N … y_0 into equal segments of
        re-solve; 0 anchors: none, the paper's adjoint)."""
        steps = len(self.nodes) - 1
        if self.mode != "adjoint" or self.anchors >= steps:
            return frozenset(range(steps)), None
        if self.anchors == 0:
            return frozenset(), None
        if self.solver.ranks_anchors:
            return frozenset(), RankedAnchors(self.anchors)
        a = self.anchors  # N − ⌊jN/(a+1) + ½⌋, j = 1…a: distinct, and y_0 only when a ≥ N
        return frozenset(steps - (2 * j * steps + a + 1) // (2 * (a + 1)) for j in range(1, a + 1)), None


def _expand_batch(c: torch.Tensor | None, batch: int, name: str):
    if c is None or not isinstance(c, torch.Tensor) or c.dim() == 0:
        return c
    if c.shape[0] == batch:
        return c
    if c.shape[0] == 1:
        return c.expand(batch, *c.shape[1:])
    raise ValueError(f"{name} has batch {c.shape[0]} but x_T has batch {batch}")


def _differentiable_params(eps_fn, params) -> list[torch.Tensor]:
    """The module's parameters and the extra ``params`` that require grad, each once."""
    candidates = list(eps_fn.parameters()) if isinstance(eps_fn, torch.nn.Module) else []
    candidates += list(params or [])
    unique = {id(p): p for p in candidates}  # a tensor listed twice must not count twice
    return [p for p in unique.values() if p.requires_grad]


def sample(eps_fn, x_T: torch.Tensor, cond=None, *, schedule: Schedule, steps: int | None,
           solver: str = "dpm3", grad_mode: str = "checkpoint", guidance_scale: float | None = None,
           uncond=None, grid: str = "logsnr", t_start: float | None = None,
           t_end: float | None = None, callback: Callable[[Progress], None] | None = None,
           timesteps: Sequence[float] | None = None, params: Sequence[torch.Tensor] | None = None,
           rtol: float = 1e-5, atol: float = 1e-5, prediction: str = "epsilon",
           memory_budget: float | None = None, network_dtype: torch.dtype | None = None,
           truncate: int | None = None,
           on_plan: Callable[[MemoryPlan], None] | None = None) -> torch.Tensor:
    """Solve paper eq. 10 from ``x_T`` (the state at ``t_start``) to ``x_0`` (at ``t_end``).

    ``x_0`` is differentiable w.r.t. ``x_T``, ``cond``, ``uncond``, the parameters of ``eps_fn``
    when it is an ``nn.Module`` and any extra ``params``, in every ``grad_mode`` but ``none``.
    ``timesteps`` (decreasing, ``steps + 1`` of them if both are given) overrides the grid.
    ``callback`` receives :class:`Progress`; raising from it aborts the solve (cancellation).
    ``network_dtype``: the precision ``eps_fn`` runs in when it differs from x_T's (fp16/bf16
    networks with a float32 solver state and float32 gradients; docs/design.md §2.4.2).
    ``prediction`` says what ``eps_fn`` returns: ``epsilon``, ``v``, ``velocity`` (a flow model's
    ``dx/dσ``) or ``sample`` (x_0); it is turned into ε inside the field (core/_prediction.py).
    ``grad_mode``: ``checkpoint`` stores the states and recomputes each network call in the
    backward pass (memory flat in steps); ``backprop`` keeps every call's graph; ``auto`` keeps the
    graphs of as many of the last steps as ``memory_budget`` bytes hold (default: half the free
    memory of x_T's device) and recomputes the rest — the same exact gradient at up to backprop's
    speed (core/_memory.py); ``adjoint`` re-solves the trajectory backward (the paper's eq. 11), from
    ``y_N`` only or, given ``memory_budget``, from the nearest of the exact states it holds.
    ``truncate=K`` (approximate, DRaFT-K): the same forward pass, but the gradient flows through
    the last ``K`` steps only — the state entering them, and the network calls before them, are
    constants — so ``x_T`` gets none and ``cond``/weights only the last steps' terms; ``K`` ≥ the
    number of steps is the exact gradient.
    ``on_plan`` receives the gradient pass's :class:`MemoryPlan` once it is made (``auto``: at
    the first step, from the measured size of one network call's graph; when even that does not
    fit the budget, ``auto`` also checkpoints inside a network that declares
    ``BlockCheckpointing``; ``backprop``: every step's graph kept, before the forward pass).
    """
    if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point():
        raise TypeError("x_T must be a floating-point tensor")
    if x_T.dim() < 1 or x_T.shape[0] < 1:
        raise ValueError(f"x_T must have a leading batch dimension; got shape {tuple(x_T.shape)}")
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"unknown grad_mode {grad_mode!r}; choose one of {', '.join(GRAD_MODES)}")
    if memory_budget is not None and not (isinstance(memory_budget, (int, float))
                                          and math.isfinite(memory_budget) and memory_budget >= 0):
        raise ValueError(f"memory_budget must be a finite number of bytes >= 0; got {memory_budget!r}")
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; choose one of {', '.join(GRIDS)}")
    check_prediction(prediction)
    step_solver = get_solver(solver, schedule, rtol=rtol, atol=atol)
    if timesteps is not None:
        if t_start is not None or t_end is not None:
            raise ValueError("give either timesteps or t_start/t_end, not both")
        ts = torch.as_tensor([float(t) for t in timesteps], dtype=torch.float64)
        if ts.numel() < 2:
            raise ValueError("timesteps needs at least 2 entries")
        if steps is not None and int(steps) != ts.numel() - 1:
            raise ValueError(f"steps={steps} but {ts.numel()} timesteps give {ts.numel() - 1} steps")
        if not bool((ts[1:] < ts[:-1]).all()):
            raise ValueError("timesteps must be strictly decreasing")
        for k, t in enumerate(ts):
            schedule.check_t(float(t), f"timesteps[{k}]")
    else:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
        t_start = schedule.check_t(schedule.t_max if t_start is None else t_start, "t_start")
        t_end = schedule.check_t(schedule.t_min if t_end is None else t_end, "t_end")
        if not t_end < t_start:
            raise ValueError(f"t_end ({t_end}) must be smaller than t_start ({t_start})")
        ts = time_grid(schedule, steps, grid, t_start, t_end)
    batch = x_T.shape[0]
    cond = _expand_batch(cond, batch, "cond")
    uncond = _expand_batch(uncond, batch, "uncond")
    field = GuidedEps(eps_fn, guidance_scale, prediction=prediction, schedule=schedule,
                      network_dtype=network_dtype)
    if field.guided:
        if cond is None or uncond is None:
            raise ValueError("guidance_scale needs both cond and uncond")
        if cond.shape != uncond.shape:
            raise ValueError(f"cond {tuple(cond.shape)} and uncond {tuple(uncond.shape)} differ in shape")
    nodes = nodes_from_times(schedule, ts)
    if truncate is not None:
        if isinstance(truncate, bool) or not isinstance(truncate, int) or truncate < 1:
            raise ValueError(f"truncate must be an integer >= 1 (steps with a gradient); got {truncate!r}")
        if grad_mode == "backprop" and truncate < len(nodes) - 1:
            raise ValueError("truncate needs grad_mode auto, checkpoint or adjoint")
        truncate = min(truncate, len(nodes) - 1)
    progress = None
    if callback is not None:
        def progress(phase, step, total, t):
            callback(Progress(phase, step, total, t, field.nfe))

    y0 = x_T / nodes[0].alpha
    theta = _differentiable_params(eps_fn, params) if grad_mode in ("auto", "checkpoint", "adjoint") else []
    conds = [c for c in (cond, uncond) if isinstance(c, torch.Tensor)]
    wants_grad = torch.is_grad_enabled() and grad_mode != "none" and (
        y0.requires_grad or bool(theta) or any(c.requires_grad for c in conds) or grad_mode == "backprop")
    if not wants_grad:
        with torch.no_grad():
            y_end, _ = step_solver.solve(field, y0, nodes, cond, uncond, callback=progress)
    elif grad_mode == "backprop":
        if on_plan is not None:  # plain autograd: every step's graph kept, nothing recomputed
            n = len(nodes) - 1
            on_plan(MemoryPlan("backprop", n, n, kept_graphs=n, budget_bytes=int(memory_budget or 0)))
        y_end, _ = step_solver.solve(field, y0, nodes, cond, uncond, callback=progress)
    else:
        solve = _Solve(step_solver, field, nodes, grad_mode, progress,
                       truncate=len(nodes) - 1 if truncate is None else truncate, report=on_plan)
        if grad_mode == "auto":
            solve.memory_budget = default_budget(y0.device) if memory_budget is None else memory_budget
        elif grad_mode == "adjoint":
            solve.memory_budget = memory_budget or 0.0
            solve.anchors = plan_anchors(len(nodes) - 1, memory_budget, y0.numel() * y0.element_size(),
                                          pending=step_solver.order if step_solver.ranks_anchors else 0)
        y_end = SolveFunction.apply(solve, y0, cond, uncond, *theta)
    return y_end * nodes[-1].alpha
