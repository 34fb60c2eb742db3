"""OptimizeLatent: make x_T (or, during sampling, x_t) minimize a loss on the output.

Two modes: optimize the starting noise with Adam/SGD through the whole sampler, optionally kept
in an L∞/L2 ε-ball around the start (the paper's security audit, §4.1.2) or on its sphere, each
sample keeping its best iterate and stopping on its own (``stop_when``); or guided sampling
(§4.1.1): at every k-th node, step x_t against ∂L/∂x_t (the adjoint solve from t, paper eq. 11
started at that t) before sampling on, the step normalized per sample so that its strength does
not depend on the batch or the loss's scale (docs/design.md §7).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core import time_grid
from ..errors import InvalidArgument
from ..integrity import MAX_WEIGHT, check_number, check_result
from ..telemetry import tracing
from ._context import TaskContext
from ._generation import prepare, run_sampler
from ._images import to_png
from ._job import Job
from ._objective import Evaluation, Objective
from ._optim import check_iterations, check_stop, make_optimizer, master_tensor, optimize, report
from ._specs import GenerationSpec, LossSpec
from ._work import check_work, guided_work, optimize_latent_work
from .compute_gradient import check_grad_mode

__all__ = ["OptimizeResult", "run_optimize_latent", "project", "BestIterates", "guided_step"]

NORMS = ("", "linf", "l2", "sphere")
GUIDED_STEPS = ("normalized", "raw")


@dataclass
class OptimizeResult:
    loss: float
    history: list[float]
    x_T: torch.Tensor
    x0: torch.Tensor
    images: list[bytes]
    initial_images: list[bytes] = field(default_factory=list)
    artifact: object = None
    sample_losses: list[float] = field(default_factory=list)
    best_iteration: list[int] = field(default_factory=list)
    stopped: list[bool] = field(default_factory=list)
    iterations_run: int = 0
    last_x_T: torch.Tensor | None = None

    def __post_init__(self):
        """Never sent with OK unless finite (each iteration's loss was checked as it came)."""
        for name in ("x_T", "x0", "last_x_T"):
            if getattr(self, name) is not None:
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


class BestIterates:
    """Per sample: the best iterate so far, and ``stop_when``. A sample that meets the loss
    threshold or whose verdict changed keeps *that* iterate and is frozen; one out of patience is
    frozen at its best."""

    def __init__(self, stop):
        self.stop = stop  # the request's stop_when, or None: only the best iterate is kept
        self.loss = None

    def observe(self, it: int, x: torch.Tensor, x0: torch.Tensor, losses: torch.Tensor,
                flipped: torch.Tensor | None = None) -> None:
        losses = losses.to(torch.float64)
        if self.loss is None:
            b = x.shape[0]
            self.loss = torch.full((b,), float("inf"), dtype=torch.float64)
            self.x, self.x0 = x.detach().clone(), x0.detach().clone()
            self.iteration = torch.zeros(b, dtype=torch.long)
            self.stopped = torch.zeros(b, dtype=torch.bool)
        active = ~self.stopped
        met = torch.zeros_like(active)
        stop = self.stop
        if stop is not None and stop.loss_below is not None:
            met |= losses <= stop.loss_below
        if stop is not None and stop.verdict_changed and flipped is not None:
            met |= flipped.to("cpu")
        met &= active
        take = (active & (losses < self.loss)) | met
        self.loss = torch.where(take, losses, self.loss)
        self.iteration = torch.where(take, torch.full_like(self.iteration, it), self.iteration)
        where = take.to(x.device).view(-1, *[1] * (x.dim() - 1))
        self.x = torch.where(where, x.detach(), self.x)
        self.x0 = torch.where(where.view(-1, *[1] * (x0.dim() - 1)), x0.detach(), self.x0)
        if stop is not None and stop.patience:
            met |= active & (it - self.iteration >= stop.patience)
        self.stopped |= met

    def freeze(self, x: torch.Tensor) -> None:
        """Put the stopped samples back where they stopped (after an optimizer step moved them)."""
        if self.stopped.any():
            where = self.stopped.to(x.device).view(-1, *[1] * (x.dim() - 1))
            x.copy_(torch.where(where, self.x, x))


def guided_step(g: torch.Tensor, scale: float, kind: str, clip: float, sigma: float = 1.0) -> torch.Tensor:
    """The guidance step for ∂L/∂x_t: ``normalized`` moves each sample by scale · σ_t · g / rms(g)
    (per entry ``scale`` times the noise level at t, whatever the batch or the loss's units; like
    classifier guidance's σ_t ∇ log p(y | x_t), it fades as the image settles), ``raw`` by
    scale · g; then each entry is clipped to ±clip when clip > 0."""
    if kind == "raw":
        delta = scale * g
    else:
        rms = g.flatten(1).square().mean(1).sqrt().clamp_min(1e-20)
        delta = (scale * sigma) * g / rms.view(-1, *[1] * (g.dim() - 1))
    return delta.clamp(-clip, clip) if clip > 0 else delta


def run_optimize_latent(ctx: TaskContext, spec: GenerationSpec, losses: list[LossSpec], job: Job,
                        opts) -> OptimizeResult:
    """OptimizeLatent with the request's options ``opts`` (``adjointdpm.options``' type)."""
    optimizer, norm, epsilon, norm_weight = opts, opts.constraint, opts.epsilon, opts.norm_weight
    image_every, grad_mode, memory_budget_mib = opts.image_every, opts.grad_mode, opts.memory_budget_mib
    guided, stop = opts.guided, opts.stop_when
    check_iterations(optimizer, ctx.limits)
    check_stop(stop, ctx.limits, per_sample=True)
    mode = check_grad_mode(grad_mode)
    if norm not in NORMS:
        raise InvalidArgument(f"constraint norm must be one of linf, l2, sphere; got {norm!r}")
    epsilon = check_number("constraint.epsilon", epsilon, 1e6)
    norm_weight = check_number("norm_weight", norm_weight, MAX_WEIGHT)
    if norm in ("linf", "l2") and not epsilon > 0:
        raise InvalidArgument(f"a {norm} constraint needs epsilon > 0")
    if guided is not None:
        if stop is not None:
            raise InvalidArgument("stop_when applies to optimizing x_T, not to guided sampling")
        if guided.step not in GUIDED_STEPS:
            raise InvalidArgument(f"guided.step must be normalized or raw; got {guided.step!r}")
        check_number("guided.clip", guided.clip, 1e6)
        if guided.clip < 0:
            raise InvalidArgument(f"guided.clip must be ≥ 0; got {guided.clip}")
    prep = prepare(ctx, spec)
    if guided is None:
        check_work(ctx.limits, optimize_latent_work(prep.steps, prep.solver, mode, optimizer.iterations))
    else:
        _check_guided(prep, guided, mode, ctx.limits)
    verdict = stop is not None and stop.verdict_changed
    if verdict and not prep.backend.has_classifier:
        raise InvalidArgument("stop_when.verdict_changed needs a model with a classifier (digits)")
    objective = Objective(ctx, prep.backend, losses, job)
    if guided is not None:
        return _guided(prep, objective, job, optimizer, guided, mode, memory_budget_mib)

    with torch.no_grad():
        x0_start = run_sampler(prep, job, grad_mode="none")
        image_start = prep.backend.decode(x0_start)
        initial = to_png(image_start)
        start_class = prep.backend.classify(image_start).argmax(1) if verdict else None
    objective.set_reference({"latent": x0_start, "image": image_start})  # for content terms
    start = master_tensor(prep.x_T)  # float32 under a half network: Adam steps it there
    x = start.clone().requires_grad_()
    opt = make_optimizer(optimizer, [x])
    dim = x[0].numel()
    best = BestIterates(stop)

    def evaluate(it, x0):
        images = prep.backend.decode(x0) if objective.needs_image or image_every or verdict else None
        total, values, per_sample = objective(x0, images)
        if norm_weight:
            penalty = norm_weight * (x.flatten(1).square().sum(1) / dim - 1).square()
            total, per_sample = total + penalty.sum(), per_sample + penalty.detach().to("cpu", torch.float64)
        flipped = None
        if verdict:
            with torch.no_grad():
                flipped = prep.backend.classify(images.detach()).argmax(1) != start_class
        best.observe(it, x, x0, per_sample, flipped)
        return Evaluation(total, values, per_sample), images

    def loss_at(it):
        objective.iteration = it
        x_now = x.detach().clone()
        evaluation, images = evaluate(it, run_sampler(prep, job, x_T=x, grad_mode=mode, iteration=it,
                                                      memory_budget_mib=memory_budget_mib))
        shown = images if image_every and it % image_every == 0 else None
        return evaluation, shown, {"x_T": x_now, "stopped": best.stopped.tolist()}

    def after_step(done):
        with torch.no_grad():
            x.copy_(project(x, start, norm, epsilon))
            best.freeze(x)
        return bool(best.stopped.all())

    history = optimize(job, opt, [x], optimizer, loss_at, after_step=after_step)
    with torch.no_grad():
        objective.iteration = len(history)
        if not best.stopped.all():  # the last step's iterate is a candidate too
            evaluate(len(history), run_sampler(prep, job, x_T=x.detach(), grad_mode="none",
                                               iteration=len(history)))
        images = prep.backend.decode(best.x0)
    return OptimizeResult(float(best.loss.sum()), history, best.x, best.x0, to_png(images), initial,
                          sample_losses=best.loss.tolist(), best_iteration=best.iteration.tolist(),
                          stopped=best.stopped.tolist(), iterations_run=len(history),
                          last_x_T=x.detach())


def _check_guided(prep, guided, mode: str, limits) -> None:
    """Each factor, then their product (the network calls), before any work."""
    every, inner, grad_steps = guided.every, guided.inner_steps, guided.grad_steps or 0
    if grad_steps > limits.max_steps:
        raise InvalidArgument(f"guided grad_steps must be at most {limits.max_steps}")
    if inner * -(-prep.steps // every) > 10_000:
        raise InvalidArgument("too many guidance gradients (steps / every × inner_steps)")
    check_work(limits, guided_work(prep.steps, prep.solver, mode, every, inner, grad_steps))


def _guided(prep, objective, job, optimizer, guided, mode: str,
            memory_budget_mib: int = 0):
    """Guided sampling: x_t ← x_t − step(∂L/∂x_t) at every ``every``-th node (§4.1.1)."""
    every, inner = guided.every, guided.inner_steps
    scale = optimizer.lr if guided.scale is None else guided.scale
    schedule = prep.backend.schedule
    t_start = schedule.t_max if prep.t_start is None else prep.t_start
    ts = time_grid(schedule, prep.steps, prep.grid, t_start, schedule.t_min).tolist()
    with torch.no_grad():
        x0_start = run_sampler(prep, job, grad_mode="none")
        initial = to_png(prep.backend.decode(x0_start))
    x, history, it = master_tensor(prep.x_T), [], 0
    for i in range(0, prep.steps, every):
        for _ in range(inner):
            job.check()
            objective.iteration = it
            xt = x.clone().requires_grad_()
            rest = guided.grad_steps or (prep.steps - i)
            x0 = run_sampler(prep, job, x_T=xt, steps=rest, grad_mode=mode, t_start=ts[i], iteration=it,
                             memory_budget_mib=memory_budget_mib)
            evaluation = objective(x0)
            with tracing.span("adjointdpm.backward"):
                (g,) = torch.autograd.grad(evaluation.total, [xt])
            history.append(report(job, it, evaluation, float(g.norm()), lr=scale, iterate=[xt]))
            sigma = float(schedule.sigma(torch.tensor(ts[i], dtype=torch.float64)))
            x = (x - guided_step(g, scale, guided.step, guided.clip, sigma)).detach()
            it += 1
        segment = ts[i:min(i + every, prep.steps) + 1]
        with torch.no_grad():
            # a callback of its own (counting from the job's nfe now: a shared one counted
            # from the start and took the progress nfe back after each gradient)
            x = run_sampler(prep, job, x_T=x, steps=len(segment) - 1, grad_mode="none",
                            timesteps=segment)
    with torch.no_grad():
        images = prep.backend.decode(x)
        evaluation = objective(x, images)
    return OptimizeResult(float(evaluation.total), history, prep.x_T.detach(), x, to_png(images),
                          initial, sample_losses=evaluation.per_sample.tolist(), iterations_run=it)
