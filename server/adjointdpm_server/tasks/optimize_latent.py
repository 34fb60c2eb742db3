"""OptimizeLatent: make x_T (or, during sampling, x_t) minimize a loss on the output.

Two modes: optimize the starting noise with Adam/SGD through the whole sampler, optionally kept
in an L∞/L2 ε-ball around the start (the paper's security audit, §4.1.2) or on its sphere; or
guided sampling (§4.1.1): at every k-th node, step x_t against ∂L/∂x_t (the adjoint solve from t,
paper eq. 11 started at that t) before sampling on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core import time_grid
from ..errors import InvalidArgument
from ..integrity import MAX_WEIGHT, check_number, check_result
from ._context import TaskContext
from ._generation import prepare, progress_callback, run_sampler
from ._images import to_png
from ._job import Job
from ._objective import Objective
from ._optim import check_iterations, make_optimizer, optimize, report
from ._specs import GenerationSpec, GuidedSpec, LossSpec, OptimizerSpec
from .gradient import check_grad_mode

__all__ = ["OptimizeResult", "run_optimize_latent", "project"]

NORMS = ("", "linf", "l2", "sphere")


@dataclass
class OptimizeResult:
    loss: float
    history: list[float]
    x_T: torch.Tensor
    x0: torch.Tensor
    images: list[bytes]
    initial_images: list[bytes] = field(default_factory=list)
    artifact: object = None

    def __post_init__(self):
        """Never sent with OK unless finite (each iteration's loss was checked as it came)."""
        for name in ("x_T", "x0"):
            check_result(name, getattr(self, name), from_inputs=True)
        check_result("loss", torch.tensor(self.loss), from_inputs=True)


def project(x: torch.Tensor, start: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Back into the feasible set: the ε-ball around ``start`` (per sample) or its sphere."""
    if norm == "linf":
        return start + (x - start).clamp(-eps, eps)
    if norm == "l2":
        delta = (x - start).flatten(1)
        scale = (eps / delta.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
        return start + (delta * scale[:, None]).view_as(x)
    if norm == "sphere":
        radius = start.flatten(1).norm(dim=1)
        return x * (radius / x.flatten(1).norm(dim=1).clamp_min(1e-12)).view(-1, *[1] * (x.dim() - 1))
    return x


def run_optimize_latent(ctx: TaskContext, spec: GenerationSpec, losses: list[LossSpec], job: Job, *,
                        optimizer: OptimizerSpec, norm: str = "", epsilon: float = 0.0,
                        norm_weight: float = 0.0, image_every: int = 0, grad_mode: str = "",
                        guided: GuidedSpec | None = None) -> OptimizeResult:
    check_iterations(optimizer, ctx.limits)
    mode = check_grad_mode(grad_mode)
    if norm not in NORMS:
        raise InvalidArgument(f"constraint norm must be one of linf, l2, sphere; got {norm!r}")
    epsilon = check_number("constraint.epsilon", epsilon, 1e6)
    norm_weight = check_number("norm_weight", norm_weight, MAX_WEIGHT)
    if norm in ("linf", "l2") and not epsilon > 0:
        raise InvalidArgument(f"a {norm} constraint needs epsilon > 0")
    prep = prepare(ctx, spec)
    objective = Objective(ctx, prep.backend, losses, job)
    if guided is not None:
        return _guided(prep, objective, job, optimizer, guided, mode, ctx.limits)

    with torch.no_grad():
        x0_start = run_sampler(prep, job, grad_mode="none")
        image_start = prep.backend.decode(x0_start)
        initial = to_png(image_start)
    objective.set_reference({"latent": x0_start, "image": image_start})  # for content terms
    start = prep.x_T.detach().clone()
    x = start.clone().requires_grad_()
    opt = make_optimizer(optimizer, [x])
    dim = x[0].numel()

    def loss_at(it):
        objective.iteration = it
        x0 = run_sampler(prep, job, x_T=x, grad_mode=mode, iteration=it)
        images = prep.backend.decode(x0) if objective.needs_image or image_every else None
        total, values = objective(x0, images)
        if norm_weight:
            total = total + norm_weight * ((x.flatten(1).square().sum(1) / dim - 1).square()).mean()
        return total, values, images if image_every and it % image_every == 0 else None

    def keep_feasible(done):
        with torch.no_grad():
            x.copy_(project(x, start, norm, epsilon))

    history = optimize(job, opt, [x], optimizer.iterations, loss_at, after_step=keep_feasible)
    with torch.no_grad():
        objective.iteration = optimizer.iterations
        x0 = run_sampler(prep, job, x_T=x.detach(), grad_mode="none", iteration=optimizer.iterations)
        images = prep.backend.decode(x0)
        total, _ = objective(x0, images)
    return OptimizeResult(float(total), history, x.detach(), x0, to_png(images), initial)


def _guided(prep, objective, job, optimizer: OptimizerSpec, guided: GuidedSpec, mode: str, limits):
    """Guided sampling: x_t ← x_t − scale·∂L/∂x_t at every ``every``-th node (§4.1.1)."""
    every = guided.every or 1
    scale = guided.scale or optimizer.lr
    inner = guided.inner_steps or 1
    if guided.grad_steps > limits.max_steps:
        raise InvalidArgument(f"guided grad_steps must be at most {limits.max_steps}")
    if inner * -(-prep.steps // every) > 10_000:
        raise InvalidArgument("too many guidance gradients (steps / every × inner_steps)")
    schedule = prep.backend.schedule
    t_start = schedule.t_max if prep.t_start is None else prep.t_start
    ts = time_grid(schedule, prep.steps, prep.grid, t_start, schedule.t_min).tolist()
    with torch.no_grad():
        x0_start = run_sampler(prep, job, grad_mode="none")
        initial = to_png(prep.backend.decode(x0_start))
    x, history, it = prep.x_T.detach().clone(), [], 0
    callback = progress_callback(job)
    for i in range(0, prep.steps, every):
        for _ in range(inner):
            job.check()
            objective.iteration = it
            xt = x.clone().requires_grad_()
            rest = guided.grad_steps or (prep.steps - i)
            x0 = run_sampler(prep, job, x_T=xt, steps=rest, grad_mode=mode, t_start=ts[i],
                             iteration=it)
            total, values = objective(x0)
            (g,) = torch.autograd.grad(total, [xt])
            history.append(report(job, it, total, values, float(g.norm())))
            x = (x - scale * g).detach()
            it += 1
        segment = ts[i:min(i + every, prep.steps) + 1]
        with torch.no_grad():
            x = run_sampler(prep, job, x_T=x, steps=len(segment) - 1, grad_mode="none",
                            timesteps=segment, callback=callback)
    with torch.no_grad():
        images = prep.backend.decode(x)
        total, _ = objective(x, images)
    return OptimizeResult(float(total), history, prep.x_T.detach(), x, to_png(images), initial)
