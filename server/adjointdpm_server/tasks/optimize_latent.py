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
from ._generation import decoder_budget, prepare, run_sampler
from ._images import to_png
from ._job import Job
from ._objective import Evaluation, Objective, generation_conditions
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
        """Nothing seen yet: the batch's size comes with the first ``observe``."""
        self.stop = stop  # the request's stop_when, or None: only the best iterate is kept
        self.loss = None

    def observe(self, it: int, x: torch.Tensor, x0: torch.Tensor, losses: torch.Tensor,
                flipped: torch.Tensor | None = None) -> None:
        """Iteration ``it``'s per-sample losses at x (→ x0): keep improvements, stop whom stop_when says."""
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
    """OptimizeLatent with the request's options ``opts`` (``adjointdpm.options``' type): the whole
    request checked before any work, then guided sampling (§4.1.1) or the search over x_T (§4.1.2)."""
    mode = _check_options(ctx.limits, opts)
    prep = prepare(ctx, spec)
    _check_run(ctx.limits, prep, opts, mode)
    objective = Objective(ctx, prep.backend, losses, job,
                          conditions=generation_conditions(spec, prep))  # each sample's prompt or label
    objective.plan_decoder(len(prep.x_T), decoder_budget(prep, job, opts.memory_budget_mib),
                           opts.decoder_tile)
    if opts.guided is not None:
        return _Guidance(prep, objective, job, opts, mode).run()
    return _LatentSearch(prep, objective, job, opts, mode).run()


def _check_options(limits, opts) -> str:
    """Refuse a malformed request before the model is touched; returns the checked grad mode."""
    check_iterations(opts, limits)
    check_stop(opts.stop_when, limits, per_sample=True)
    mode = check_grad_mode(opts.grad_mode)
    _check_constraint(opts)
    if opts.guided is not None:
        _check_guidance(opts.guided, opts.stop_when)
    return mode


def _check_constraint(opts) -> None:
    """The feasible set (the audit's ε-ball, §4.1.2, or the sphere) and the norm penalty are sound."""
    if opts.constraint not in NORMS:
        raise InvalidArgument(f"constraint norm must be one of linf, l2, sphere; got {opts.constraint!r}")
    check_number("constraint.epsilon", opts.epsilon, 1e6)
    check_number("norm_weight", opts.norm_weight, MAX_WEIGHT)
    if opts.constraint in ("linf", "l2") and not opts.epsilon > 0:
        raise InvalidArgument(f"a {opts.constraint} constraint needs epsilon > 0")


def _check_guidance(guided, stop) -> None:
    """Guided sampling (§4.1.1) steps by a known rule and has no per-sample stop to honour."""
    if stop is not None:
        raise InvalidArgument("stop_when applies to optimizing x_T, not to guided sampling")
    if guided.step not in GUIDED_STEPS:
        raise InvalidArgument(f"guided.step must be normalized or raw; got {guided.step!r}")
    check_number("guided.clip", guided.clip, 1e6)
    if guided.clip < 0:
        raise InvalidArgument(f"guided.clip must be ≥ 0; got {guided.clip}")


def _check_run(limits, prep, opts, mode: str) -> None:
    """What needs the prepared sampler: the network calls bounded, a verdict with a classifier."""
    if opts.guided is None:
        check_work(limits, optimize_latent_work(prep.steps, prep.solver, mode, opts.iterations))
    else:
        _check_guided(prep, opts.guided, mode, limits)
    if opts.stop_when is not None and opts.stop_when.verdict_changed and not prep.backend.has_classifier:
        raise InvalidArgument("stop_when.verdict_changed needs a model with a classifier (digits)")


def _check_guided(prep, guided, mode: str, limits) -> None:
    """Each factor, then their product (the network calls), before any work."""
    every, inner, grad_steps = guided.every, guided.inner_steps, guided.grad_steps or 0
    if grad_steps > limits.max_steps:
        raise InvalidArgument(f"guided grad_steps must be at most {limits.max_steps}")
    if inner * -(-prep.steps // every) > 10_000:
        raise InvalidArgument("too many guidance gradients (steps / every × inner_steps)")
    check_work(limits, guided_work(prep.steps, prep.solver, mode, every, inner, grad_steps))


class _LatentSearch:
    """One search over x_T through the whole sampler (the audit of §4.1.2 when constrained): the
    prepared sampler, the objective, the start, the iterate ``x`` and each sample's best."""

    def __init__(self, prep, objective: Objective, job: Job, opts, mode: str):
        """The run's parts; the start, x and the best iterates come when ``run`` samples the start."""
        self.prep, self.objective, self.job, self.opts, self.mode = prep, objective, job, opts, mode
        self.verdict = opts.stop_when is not None and opts.stop_when.verdict_changed
        self.start_class = None  # the unoptimized verdict, when stop_when.verdict_changed asks

    def run(self) -> OptimizeResult:
        """Sample the start, step x_T by the optimizer from it, then report each sample's best."""
        initial = self.sample_start()
        self.start = master_tensor(self.prep.x_T)  # float32 under a half network: Adam steps it there
        self.x = self.start.clone().requires_grad_()
        opt = make_optimizer(self.opts, [self.x])
        self.dim = self.x[0].numel()
        self.best = BestIterates(self.opts.stop_when)
        history = optimize(self.job, opt, [self.x], self.opts, self.loss_at, after_step=self.after_step)
        return self.finish(history, initial)

    def sample_start(self) -> list[bytes]:
        """The unoptimized sample: its PNGs, the content terms' reference and the verdict to flip."""
        with torch.no_grad():
            x0_start = run_sampler(self.prep, self.job, grad_mode="none")
            image_start = self.objective.reference_image(x0_start)
            initial = to_png(image_start)
            if self.verdict:
                self.start_class = self.prep.backend.classify(image_start).argmax(1)
        self.objective.set_reference({"latent": x0_start, "image": image_start})  # for content terms
        return initial

    def loss_at(self, it: int):
        """One iteration's loss through the sampler from x_T, with the event's x_T and stopped."""
        self.objective.iteration = it
        x_now = self.x.detach().clone()
        x0 = run_sampler(self.prep, self.job, x_T=self.x, grad_mode=self.mode, iteration=it,
                         memory_budget_mib=self.opts.memory_budget_mib)
        evaluation, images = self.evaluate(it, x0)
        every = self.opts.image_every
        shown = images if every and it % every == 0 else None
        return evaluation, shown, {"x_T": x_now, "stopped": self.best.stopped.tolist()}

    def evaluate(self, it: int, x0: torch.Tensor):
        """Score x0 (plus the norm penalty) and let each sample keep its best or stop on it."""
        needs_image = self.objective.needs_image or self.opts.image_every or self.verdict
        images = self.objective.decode(x0) if needs_image else None
        total, values, per_sample = self.objective(x0, images)
        if self.opts.norm_weight:
            penalty = self.norm_penalty()
            total, per_sample = total + penalty.sum(), per_sample + penalty.detach().to("cpu", torch.float64)
        self.best.observe(it, self.x, x0, per_sample, self.flipped(images))
        return Evaluation(total, values, per_sample), images

    def norm_penalty(self) -> torch.Tensor:
        """norm_weight · (|x_T|²/d − 1)² per sample: keeps x_T where Gaussian noise lives."""
        return self.opts.norm_weight * (self.x.flatten(1).square().sum(1) / self.dim - 1).square()

    def flipped(self, images) -> torch.Tensor | None:
        """Per sample, whether the classifier's verdict left the start's (the audit's finding, §4.1.2)."""
        if not self.verdict:
            return None
        with torch.no_grad():
            return self.prep.backend.classify(images.detach()).argmax(1) != self.start_class

    def after_step(self, done: int) -> bool:
        """Back into the feasible set and stopped samples frozen; True once every sample stopped."""
        with torch.no_grad():
            self.x.copy_(project(self.x, self.start, self.opts.constraint, self.opts.epsilon))
            self.best.freeze(self.x)
        return bool(self.best.stopped.all())

    def finish(self, history: list[float], initial: list[bytes]) -> OptimizeResult:
        """The result from each sample's best iterate, the last step's iterate a candidate too."""
        best, n = self.best, len(history)
        with torch.no_grad():
            self.objective.iteration = n
            if not best.stopped.all():  # the last step's iterate is a candidate too
                self.evaluate(n, run_sampler(self.prep, self.job, x_T=self.x.detach(), grad_mode="none",
                                             iteration=n))
            images = self.prep.backend.decode(best.x0)
        return OptimizeResult(float(best.loss.sum()), history, best.x, best.x0, to_png(images), initial,
                              sample_losses=best.loss.tolist(), best_iteration=best.iteration.tolist(),
                              stopped=best.stopped.tolist(), iterations_run=n, last_x_T=self.x.detach())


class _Guidance:
    """Guided sampling (§4.1.1): x_t ← x_t − step(∂L/∂x_t) at every ``every``-th node, then on."""

    def __init__(self, prep, objective: Objective, job: Job, opts, mode: str):
        """The step's size (``guided.scale``, else the lr) and the sampler's time grid to guide on."""
        self.prep, self.objective, self.job, self.opts, self.mode = prep, objective, job, opts, mode
        self.scale = opts.lr if opts.guided.scale is None else opts.guided.scale
        schedule = prep.backend.schedule
        t_start = schedule.t_max if prep.t_start is None else prep.t_start
        self.ts = time_grid(schedule, prep.steps, prep.grid, t_start, schedule.t_min).tolist()
        self.history, self.it = [], 0

    def run(self) -> OptimizeResult:
        """Step x_t at each guided node, sample on to the next, then score the sample."""
        prep, guided = self.prep, self.opts.guided
        with torch.no_grad():
            x0_start = run_sampler(prep, self.job, grad_mode="none")
            initial = to_png(prep.backend.decode(x0_start))
        x = master_tensor(prep.x_T)
        for i in range(0, prep.steps, guided.every):
            for _ in range(guided.inner_steps):
                x = self.step(x, i)
            x = self.sample_on(x, i)
        return self.finish(x, initial)

    def step(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """One guidance step at node i: ∂L/∂x_t by the adjoint solve from t (eq. 11), reported."""
        self.job.check()
        guided, it = self.opts.guided, self.it
        self.objective.iteration = it
        xt = x.clone().requires_grad_()
        rest = guided.grad_steps or (self.prep.steps - i)
        x0 = run_sampler(self.prep, self.job, x_T=xt, steps=rest, grad_mode=self.mode, t_start=self.ts[i],
                         iteration=it, memory_budget_mib=self.opts.memory_budget_mib)
        evaluation = self.objective(x0)
        with tracing.span("adjointdpm.backward"):
            (g,) = torch.autograd.grad(evaluation.total, [xt])
        self.history.append(report(self.job, it, evaluation, float(g.norm()), lr=self.scale, iterate=[xt]))
        sigma = float(self.prep.backend.schedule.sigma(torch.tensor(self.ts[i], dtype=torch.float64)))
        self.it += 1
        return (x - guided_step(g, self.scale, guided.step, guided.clip, sigma)).detach()

    def sample_on(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Sample without gradients from node i to the next guided node (or the end)."""
        segment = self.ts[i:min(i + self.opts.guided.every, self.prep.steps) + 1]
        with torch.no_grad():
            # a callback of its own (counting from the job's nfe now: a shared one counted
            # from the start and took the progress nfe back after each gradient)
            return run_sampler(self.prep, self.job, x_T=x, steps=len(segment) - 1, grad_mode="none",
                               timesteps=segment).to(x.dtype)  # the state stays float32

    def finish(self, x: torch.Tensor, initial: list[bytes]) -> OptimizeResult:
        """The guided sample, scored once more with its images for the result."""
        with torch.no_grad():
            x = x.to(self.prep.backend.dtype)  # the network's dtype, as run_sampler returns x_0
            images = self.prep.backend.decode(x)
            evaluation = self.objective(x, images)
        return OptimizeResult(float(evaluation.total), self.history, self.prep.x_T.detach(), x, to_png(images),
                              initial, sample_losses=evaluation.per_sample.tolist(), iterations_run=self.it)
