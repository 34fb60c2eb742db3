"""From a GenerationSpec to the arguments of ``core.sample``: model, noise, conditioning, solver.

Every size is checked against the server's limits before a tensor is made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..core import GRIDS, HALF_DTYPES, SOLVERS, Progress, default_budget, sample
from ..errors import InvalidArgument
from ..models import Conditioning, ModelBackend
from ..telemetry import tracing
from ._context import NetworkCalls, TaskContext
from ._job import Job
from ._specs import GenerationSpec

__all__ = ["Prepared", "prepare", "run_sampler", "progress_callback"]


@dataclass
class Prepared:
    model: str
    backend: ModelBackend
    eps_fn: torch.nn.Module
    x_T: torch.Tensor
    cond: object
    uncond: object
    steps: int
    solver: str
    grid: str
    guidance_scale: float | None
    t_start: float | None
    batch: int
    prompts: list[str] = field(default_factory=list)
    engine: NetworkCalls | None = None  # what runs every network call (None: called directly)
    requested_guidance: float | None = None  # the scale asked for (CFG or a network input)
    grad_memory_bytes: int | None = None  # the server's gradient budget (None: half the free memory)

    def network(self, eps_fn, job: Job):
        """``eps_fn`` as this job calls it: through the engine, batched with other jobs."""
        return eps_fn if self.engine is None else self.engine.network(eps_fn, job, self.model)


def _batch(spec: GenerationSpec, limits) -> int:
    if spec.x_T is not None:
        batch = int(spec.x_T.shape[0]) if spec.x_T.dim() else 0
        if spec.batch and spec.batch != batch:
            raise InvalidArgument(f"batch {spec.batch} disagrees with x_T's batch {batch}")
    else:
        batch = spec.batch or max(1, len(spec.labels), len(spec.prompt))
    if not 1 <= batch <= limits.max_batch:
        raise InvalidArgument(f"batch must lie in 1…{limits.max_batch}; got {batch}")
    return batch


def _per_sample(values: list, batch: int, name: str) -> list:
    if len(values) not in (0, 1, batch):
        raise InvalidArgument(f"give one {name} or one per sample ({batch}); got {len(values)}")
    return values


def _conditioning(ctx, spec: GenerationSpec, name: str, backend: ModelBackend, batch: int) -> Conditioning:
    prompt = _per_sample(list(spec.prompt), batch, "prompt")
    negative = _per_sample(list(spec.negative_prompt), batch, "negative prompt")
    labels = _per_sample(list(spec.labels), batch, "label")
    given = sum(map(bool, (prompt, labels, spec.cond is not None, spec.embedding)))
    if given > 1 and not (spec.embedding and prompt):
        raise InvalidArgument("give one of prompt, labels, cond and embedding")
    kwargs = {}
    if negative:
        kwargs["negative_prompt"] = negative[0] if len(negative) == 1 else negative
    try:
        if spec.embedding:
            return _learned_embedding(ctx, spec.embedding, name, backend, batch, prompt, kwargs)
        if spec.cond is not None:
            shape = (batch, *backend.cond_shape)
            cond = spec.cond
            if tuple(cond.shape) not in (shape, shape[1:], (1, *shape[1:])):
                raise InvalidArgument(f"cond has shape {tuple(cond.shape)}; model {name!r} takes "
                                      f"{tuple(backend.cond_shape)} per sample")
            cond = cond.to(backend.device, backend.dtype).expand(shape).clone()
            base = backend.embed(backend.encode(batch, **kwargs))
            return Conditioning(cond, base.uncond)
        if prompt:
            kwargs["prompt"] = prompt[0] if len(prompt) == 1 else prompt
        if labels:
            kwargs["labels"] = labels
        return backend.encode(batch, **kwargs)
    except InvalidArgument:
        raise
    except ValueError as err:
        raise InvalidArgument(f"model {name!r}: {err}") from err


def _learned_embedding(ctx, artifact_id, name, backend, batch, prompt, kwargs) -> Conditioning:
    info = ctx.artifacts.info(artifact_id)  # check what it is before loading any tensor
    if info.kind != "embedding":
        raise InvalidArgument(f"artifact {artifact_id} is a {info.kind}, not an embedding")
    if info.model != name:
        raise InvalidArgument(f"embedding {artifact_id} was learned on {info.model!r}, not {name!r}")
    tensors, info = ctx.artifacts.load(artifact_id, device=backend.device)
    if "token" in tensors:
        placeholder = info.metadata.get("placeholder", "<*>")
        text = prompt or [info.metadata.get("prompt", placeholder)]
        return backend.encode_with_token(batch, text[0] if len(text) == 1 else text,
                                         tensors["token"].to(backend.dtype),
                                         placeholder=placeholder, **kwargs)
    cond = tensors["cond"].to(backend.dtype)
    base = backend.embed(backend.encode(batch, **kwargs))
    return Conditioning(cond.expand(batch, *cond.shape[1:]).clone(), base.uncond)


def prepare(ctx: TaskContext, spec: GenerationSpec) -> Prepared:
    """Validate against the limits, then resolve model, adapter, x_T and conditioning."""
    limits = ctx.limits
    name, backend = ctx.model(spec.model)
    batch = _batch(spec, limits)
    steps = spec.steps or backend.default_steps
    if not 1 <= steps <= limits.max_steps:
        raise InvalidArgument(f"steps must lie in 1…{limits.max_steps}; got {steps}")
    solver = spec.solver or "dpm3"
    if solver not in SOLVERS:
        raise InvalidArgument(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    grid = spec.grid or backend.default_grid
    if grid not in GRIDS:
        raise InvalidArgument(f"unknown grid {grid!r}; choose one of {', '.join(GRIDS)}")
    scale = backend.default_guidance if spec.guidance_scale is None else spec.guidance_scale
    if scale is not None and (not math.isfinite(scale) or abs(scale) > 100):
        raise InvalidArgument(f"guidance_scale must be finite and at most 100; got {scale}")
    t_start = spec.t_start
    if t_start is not None:
        if spec.x_T is None:
            raise InvalidArgument("t_start needs the state x_t at that time (x_T)")
        if not backend.schedule.t_min < t_start <= backend.schedule.t_max:
            raise InvalidArgument(f"t_start must lie in ({backend.schedule.t_min}, "
                                  f"{backend.schedule.t_max}]; got {t_start}")
    if spec.x_T is not None:
        if tuple(spec.x_T.shape[1:]) != tuple(backend.latent_shape):
            raise InvalidArgument(f"x_T has shape {tuple(spec.x_T.shape)}; model {name!r} takes "
                                  f"(B, {', '.join(map(str, backend.latent_shape))})")
        if not bool(torch.isfinite(spec.x_T).all()):
            raise InvalidArgument("x_T has NaN or Inf entries")
        x_T = spec.x_T.to(backend.device, backend.dtype)
    else:
        x_T = backend.noise(batch, spec.seed)
    c = backend.guide(_conditioning(ctx, spec, name, backend, batch), scale)
    eps_fn = ctx.adapted(name, spec.adapter)  # "": the base, sharing calls with its adapters
    cfg = None if scale == 1 or backend.guidance == "embedded" else scale  # embedded: cond carries it
    return Prepared(name, backend, eps_fn, x_T, c.cond, c.uncond, steps, solver, grid, cfg, t_start,
                    batch, list(spec.prompt), ctx.engine, scale, ctx.limits.grad_memory_bytes)


def progress_callback(job: Job, iteration: int = 0):
    """Core progress → job events, and the cancellation check between solver steps."""

    base = job.nfe  # network evaluations of earlier solves in this job
    last = [0]

    def callback(p: Progress) -> None:
        job.check()
        job.count_nfe(p.phase, p.nfe - last[0])
        last[0] = p.nfe
        job.nfe = base + p.nfe
        job.emit(_with_iteration(p, iteration))

    return callback


@dataclass(frozen=True)
class IterationProgress:
    phase: str
    step: int
    total: int
    t: float
    nfe: int
    iteration: int


def _with_iteration(p: Progress, iteration: int) -> IterationProgress:
    return IterationProgress(p.phase, p.step, p.total, p.t, p.nfe, iteration)


def _memory_budget(prep: Prepared, job: Job, grad_mode: str, request_mib: int, x_T) -> int | None:
    """The bytes ``sample`` may hold for the gradient: the server's budget (``--grad-memory-mib``,
    else half the device's free memory), lowered by the request's; for ``auto``, 0 while enough
    other gradient jobs run (a kept graph is a solo call, a recomputed one batches with theirs:
    docs/design.md §5), else shared with the gradient jobs that may keep graphs beside it; None
    for an ``adjoint`` that names none (the paper's, re-solved from y_N)."""
    company = 1
    if grad_mode == "auto" and prep.engine is not None:
        if prep.engine.shares_calls(job):
            return 0
        company = max(1, prep.engine.gradient_jobs(job))  # graphs kept side by side share it
    if grad_mode != "auto" and not (grad_mode == "adjoint" and request_mib):
        return None
    budget = prep.grad_memory_bytes if prep.grad_memory_bytes is not None else default_budget(x_T.device)
    budget //= company
    budget = min(budget, int(request_mib) << 20) if request_mib else budget
    if grad_mode == "auto" and job.decoder_plan is not None:  # the decoder's VJP runs while the
        budget = max(0, budget - job.decoder_plan.held(len(x_T)))  # kept graphs live
    return budget


def decoder_budget(prep: Prepared, job: Job, request_mib: int) -> int:
    """The bytes the VAE decoder's part of an image-domain gradient may hold: the server's
    gradient budget (``--grad-memory-mib``, else half the device's free memory), shared with the
    gradient jobs beside it, lowered by the request's. Its passes run after the sampler's forward
    pass, while ``auto``'s kept graphs live: ``auto`` plans within what the decoder leaves."""
    budget = prep.grad_memory_bytes
    if budget is None:
        budget = default_budget(prep.backend.device)
    if prep.engine is not None:
        budget //= max(1, prep.engine.gradient_jobs(job))
    return min(budget, int(request_mib) << 20) if request_mib else budget



def _float32(value):
    return value.float() if isinstance(value, torch.Tensor) and value.dtype in HALF_DTYPES else value


def run_sampler(prep: Prepared, job: Job, *, x_T=None, cond=None, uncond=None, eps_fn=None,
                grad_mode: str = "checkpoint", iteration: int = 0, steps: int | None = None,
                t_start: float | None = None, timesteps=None, callback=None,
                memory_budget_mib: int = 0, truncate: int | None = None) -> torch.Tensor:
    """``core.sample`` with the prepared arguments (any of them overridden), its network calls
    going through the engine; ``memory_budget_mib`` (0: the server's) can lower, never raise,
    the server's gradient memory budget; ``truncate``: the last steps the gradient flows through
    (None: all)."""
    x_T = prep.x_T if x_T is None else x_T
    budget = _memory_budget(prep, job, grad_mode, memory_budget_mib, x_T)
    cond = prep.cond if cond is None else cond
    uncond = prep.uncond if uncond is None else uncond
    network_dtype = None
    if prep.backend.dtype in HALF_DTYPES:
        # A half-precision network: the solver state, CFG and gradient sums run in float32
        # (differentiable casts, so gradients reach the caller's tensors, which may be float32
        # master copies of what an optimizer moves; docs/design.md §2.4.2).
        network_dtype = prep.backend.dtype
        x_T, cond, uncond = (_float32(v) for v in (x_T, cond, uncond))
    try:
        with tracing.span("adjointdpm.forward", steps=int(steps or prep.steps), solver=prep.solver,
                          grad_mode=grad_mode):
            x0 = sample(prep.network(prep.eps_fn if eps_fn is None else eps_fn, job), x_T, cond,
                        schedule=prep.backend.schedule, steps=steps or prep.steps, solver=prep.solver,
                        grad_mode=grad_mode, guidance_scale=prep.guidance_scale, uncond=uncond,
                        grid=prep.grid, t_start=None if timesteps is not None else (
                            prep.t_start if t_start is None else t_start),
                        timesteps=timesteps, prediction=prep.backend.prediction, memory_budget=budget,
                        network_dtype=network_dtype, callback=callback or progress_callback(job, iteration),
                        truncate=truncate, on_plan=lambda plan: job.report_plan(plan, iteration))
        return x0 if network_dtype is None else x0.to(network_dtype)
    except ValueError as err:
        if isinstance(err, InvalidArgument):
            raise
        raise InvalidArgument(str(err)) from err
