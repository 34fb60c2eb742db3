"""Optimizers and iteration reports shared by the optimizing tasks."""

from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager

import torch

from ..core import HALF_DTYPES
from ..errors import InvalidArgument, ServiceError
from ..integrity import NonFiniteResult
from ..storage.artifacts import MAX_NAME
from ..telemetry import tracing
from ._images import to_png
from ._job import IterationReport, Job
from ._objective import Evaluation

__all__ = ["make_optimizer", "MasterOptimizer", "master_tensor", "check_iterations", "check_name", "check_stop", "report", "optimize",
           "learning_rate", "SCHEDULES", "Patience", "non_finite_loss", "ITERATE_RANGE", "accumulated"]

SCHEDULES = ("constant", "cosine", "linear")


def check_iterations(spec, limits) -> None:
    """``spec``: the request's options (``optimizer``, ``lr``, ``iterations``, ``schedule``,
    ``warmup``)."""
    if not 1 <= spec.iterations <= limits.max_iterations:
        raise InvalidArgument(f"iterations must lie in 1…{limits.max_iterations}; got {spec.iterations}")
    if not (math.isfinite(spec.lr) and spec.lr > 0):
        raise InvalidArgument(f"the learning rate must be positive and finite; got {spec.lr}")
    if spec.schedule not in SCHEDULES:
        raise InvalidArgument(f"the learning-rate schedule must be one of {', '.join(SCHEDULES)}; "
                              f"got {spec.schedule!r}")
    if not 0 <= spec.warmup < spec.iterations:
        raise InvalidArgument(f"warmup must be fewer than the {spec.iterations} iterations; got {spec.warmup}")


def check_stop(stop, limits, *, per_sample: bool = False) -> None:
    """``per_sample``: the call stops samples one by one (OptimizeLatent), where a changed verdict
    means something; elsewhere the run stops as a whole."""
    if stop is None:
        return
    if stop.verdict_changed and not per_sample:
        raise InvalidArgument("stop_when.verdict_changed applies to OptimizeLatent")
    if stop.loss_below is not None and not math.isfinite(stop.loss_below):
        raise InvalidArgument("stop_when.loss_below must be finite")
    if stop.patience > limits.max_iterations:
        raise InvalidArgument(f"stop_when.patience must be at most {limits.max_iterations}")


def check_name(name: str) -> None:
    """A result's artifact name is checked before the work, not when the artifact is written."""
    if len(name) > MAX_NAME:
        raise InvalidArgument(f"name must be at most {MAX_NAME} characters; got {len(name)}")


def master_tensor(t: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``t`` to optimize: float32 when ``t`` is half precision (Adam's
    ε = 1e-8 and its second moments underflow in float16), else ``t``'s own dtype."""
    t = t.detach()
    return t.float() if t.dtype in HALF_DTYPES else t.clone()


class MasterOptimizer:
    """Adam or SGD whose state and weights live in float32 whatever the network's dtype: a
    half-precision parameter is stepped through a float32 master copy (its gradient upcast, the
    master cast back after each step), so a float16 network trains like a float32 one; float32 and
    float64 parameters are their own masters. ``state`` is keyed by the parameters given."""

    def __init__(self, spec, params):
        self.params = list(params)
        self.masters = [p.detach().float().requires_grad_() if p.dtype in HALF_DTYPES else p
                        for p in self.params]
        name = spec.optimizer
        if name == "adam":
            self.inner = torch.optim.Adam(self.masters, lr=spec.lr)
        elif name == "sgd":
            self.inner = torch.optim.SGD(self.masters, lr=spec.lr, momentum=spec.momentum)
        else:
            raise InvalidArgument(f"unknown optimizer {name!r}; choose adam or sgd")

    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def state(self) -> dict:
        return {p: self.inner.state[m] for p, m in zip(self.params, self.masters)}

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for p, m in zip(self.params, self.masters):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
        self.inner.step()
        for p, m in zip(self.params, self.masters):
            if m is not p:
                p.copy_(m)

    @torch.no_grad()
    def sync_from_params(self) -> None:
        """After the parameters were set from elsewhere (a checkpoint, a best state)."""
        for p, m in zip(self.params, self.masters):
            if m is not p:
                m.copy_(p)


def make_optimizer(spec, params) -> MasterOptimizer:
    return MasterOptimizer(spec, params)


def learning_rate(spec, it: int) -> float:
    """The step size of iteration ``it``: linear warm-up over ``warmup`` iterations, then the
    schedule from lr down (cosine or linear, reaching 0 one step after the last). A function of
    the iteration alone, so a resumed fine-tune continues the same curve."""
    if it < spec.warmup:
        return spec.lr * (it + 1) / (spec.warmup + 1)
    progress = (it - spec.warmup) / max(1, spec.iterations - spec.warmup)
    kind = spec.schedule
    if kind == "cosine":
        return spec.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return spec.lr * (1.0 - progress)
    return spec.lr


class Patience:
    """Run-level early stop and keep-best: ``update(loss) → True`` when the run should stop
    (the loss reached ``loss_below`` or ``patience`` updates passed without a new best)."""

    def __init__(self, stop):
        self.stop = stop  # the request's stop_when, or None: never stop early
        self.best, self.best_at, self.count, self.stop_now = math.inf, -1, 0, False

    def update(self, loss: float) -> bool:
        if loss < self.best:
            self.best, self.best_at = loss, self.count
        self.count += 1
        stop = self.stop
        below = stop is not None and stop.loss_below is not None and loss <= stop.loss_below
        tired = stop is not None and bool(stop.patience) and self.count - 1 - self.best_at >= stop.patience
        self.stop_now = below or tired
        return self.stop_now

    @property
    def improved(self) -> bool:
        """The last update was a new best."""
        return self.best_at == self.count - 1


# An iterate beyond this magnitude is out of the range any model here is made for (the float16
# safe range √65504: latents, embeddings and adapter weights live far inside it).
ITERATE_RANGE = 256.0


def non_finite_loss(loss: float, iteration: int, iterate) -> ServiceError:
    """Whose fault a non-finite loss is: the request's when its inputs or its step sizes put what
    is optimized out of range (INVALID_ARGUMENT, naming the learning rate), the server's arithmetic
    when every entry of the iterate is finite and in range (INTERNAL: NonFiniteResult)."""
    peak = max((float(t.detach().abs().max()) for t in iterate if t.numel()), default=0.0)
    if not math.isfinite(peak) or peak > ITERATE_RANGE:
        return InvalidArgument(f"the loss became {loss} at iteration {iteration}: the request's "
                               f"numbers moved what is optimized to magnitude {peak:.3g} (at most "
                               f"{ITERATE_RANGE:g} is in range); lower the learning rate")
    return NonFiniteResult(f"the loss became {loss} at iteration {iteration} from finite inputs in "
                           "range (the server's arithmetic)")


def report(job: Job, iteration: int, evaluation: Evaluation, grad_norm: float, images=None, *,
           lr: float = 0.0, x_T=None, stopped=(), iterate=()) -> float:
    """Emit one iteration's figures (and PNGs when given); a non-finite loss ends the job, blamed
    by ``non_finite_loss`` on the request or the server from the ``iterate`` it was computed at."""
    loss = float(evaluation.total.detach()) if isinstance(evaluation.total, torch.Tensor) else float(evaluation.total)
    if not math.isfinite(loss):
        raise non_finite_loss(loss, iteration, iterate)
    job.emit(IterationReport(iteration, loss, list(evaluation.values), grad_norm,
                             to_png(images) if images is not None else [],
                             evaluation.per_sample.tolist(), x_T, list(stopped), lr))
    return loss


def accumulated(parts: list[Evaluation]) -> Evaluation:
    """The evaluation of a whole batch from those of its micro-batches, whose backward passes
    have run (the objective is a sum over samples, so the batch's is the sum of theirs): the
    total and each term's value summed, the per-sample losses in batch order. One part is
    returned as it is (the same numbers as an unsplit batch, bit for bit)."""
    if len(parts) == 1:
        return parts[0]
    total = sum(float(p.total.detach()) if isinstance(p.total, torch.Tensor) else float(p.total)
                for p in parts)
    values = [sum(p.values[k] for p in parts) for k in range(len(parts[0].values))]
    return Evaluation(total, values, torch.cat([p.per_sample for p in parts]))


def optimize(job: Job, opt: MasterOptimizer, params, spec,
             loss_at: Callable[[int], tuple], *, first: int = 0, history: list | None = None,
             after_step: Callable[[int], bool | None] | None = None,
             backward_turn: Callable[[], ContextManager] = contextlib.nullcontext) -> list[float]:
    """The loop every optimizing task shares: set the step size of the schedule, ``loss_at(it) →
    (evaluation, images to report or None, extra report fields)``, backward (inside
    ``backward_turn()``: a weight-training job's pass holds the device as a turn of the fair
    share), report, step, then ``after_step(iterations done)`` (a projection, a checkpoint, a
    validation), which returns True to stop early. The job is checked between iterations
    (cancel, deadline).

    Gradient accumulation: ``loss_at`` may give, instead of one evaluation, an iterator of them,
    one per micro-batch of the iteration's batch. Each one's backward runs before the iterator
    computes the next (so only one micro-batch's graph is alive at a time), the gradients add up
    in the parameters, and the iteration reports and steps once on their sum (``accumulated``)."""
    history = [] if history is None else history
    for it in range(first, spec.iterations):
        job.check()
        lr = learning_rate(spec, it)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()  # before loss_at: an iterator's backward passes accumulate from here
        evaluation, images, extra = loss_at(it)
        parts = [evaluation] if isinstance(evaluation, Evaluation) else evaluation
        done = []
        for part in parts:
            with tracing.span("adjointdpm.backward"), backward_turn():
                part.total.backward()
            done.append(part)
        evaluation = accumulated(done)
        grad_norm = math.sqrt(sum(float(p.grad.square().sum()) for p in params if p.grad is not None))
        history.append(report(job, it, evaluation, grad_norm, images, lr=lr, iterate=params, **extra))
        opt.step()
        if after_step is not None and after_step(it + 1):
            break
    return history
