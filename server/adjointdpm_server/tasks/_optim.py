"""Optimizers and iteration reports shared by the optimizing tasks."""

from __future__ import annotations

import math

import torch

from ..errors import InvalidArgument
from ._images import to_png
from ._job import IterationReport, Job
from ._specs import OptimizerSpec

__all__ = ["make_optimizer", "check_iterations", "report"]


def check_iterations(spec: OptimizerSpec, limits) -> None:
    if not 1 <= spec.iterations <= limits.max_iterations:
        raise InvalidArgument(f"iterations must lie in 1…{limits.max_iterations}; got {spec.iterations}")
    if not (math.isfinite(spec.lr) and spec.lr > 0):
        raise InvalidArgument(f"the learning rate must be positive and finite; got {spec.lr}")


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
