"""Optimizers and iteration reports shared by the optimizing tasks."""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..artifacts import MAX_NAME
from ..errors import InvalidArgument
from ._images import to_png
from ._job import IterationReport, Job
from ._specs import OptimizerSpec

__all__ = ["make_optimizer", "check_iterations", "check_name", "report", "optimize"]


def check_iterations(spec: OptimizerSpec, limits) -> None:
    if not 1 <= spec.iterations <= limits.max_iterations:
        raise InvalidArgument(f"iterations must lie in 1…{limits.max_iterations}; got {spec.iterations}")
    if not (math.isfinite(spec.lr) and spec.lr > 0):
        raise InvalidArgument(f"the learning rate must be positive and finite; got {spec.lr}")


def check_name(name: str) -> None:
    """A result's artifact name is checked before the work, not when the artifact is written."""
    if len(name) > MAX_NAME:
        raise InvalidArgument(f"name must be at most {MAX_NAME} characters; got {len(name)}")


def make_optimizer(spec: OptimizerSpec, params) -> torch.optim.Optimizer:
    name = spec.name or "adam"
    if name == "adam":
        return torch.optim.Adam(params, lr=spec.lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum)
    raise InvalidArgument(f"unknown optimizer {name!r}; choose adam or sgd")


def report(job: Job, iteration: int, total, values, grad_norm: float, images=None) -> float:
    """Emit one iteration's figures (and PNGs when given); a non-finite loss ends the job."""
    loss = float(total.detach()) if isinstance(total, torch.Tensor) else float(total)
    if not math.isfinite(loss):
        raise InvalidArgument(f"the loss became {loss} at iteration {iteration}")
    job.emit(IterationReport(iteration, loss, list(values), grad_norm,
                             to_png(images) if images is not None else []))
    return loss


def optimize(job: Job, opt: torch.optim.Optimizer, params, iterations: int,
             loss_at: Callable[[int], tuple], *, first: int = 0, history: list | None = None,
             after_step: Callable[[int], None] | None = None) -> list[float]:
    """The loop every optimizing task shares: ``loss_at(it) → (total, term values, images to
    report or None)``, backward, report, step, then ``after_step(iterations done)`` (a
    projection, a checkpoint). The job is checked between iterations (cancel, deadline)."""
    history = [] if history is None else history
    for it in range(first, iterations):
        job.check()
        total, values, images = loss_at(it)
        opt.zero_grad()
        total.backward()
        grad_norm = math.sqrt(sum(float(p.grad.square().sum()) for p in params if p.grad is not None))
        history.append(report(job, it, total, values, grad_norm, images))
        opt.step()
        if after_step is not None:
            after_step(it + 1)
    return history
