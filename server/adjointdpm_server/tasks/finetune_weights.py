"""FinetuneWeights: LoRA or full fine-tuning of the model on a loss over (noise, prompt) examples.

The paper's stylization (§4.2, eq. 13: a Gram style term plus a content term that keeps each
example close to what the base model made of it — ``reference`` below). Works on a copy: the
resident model is never modified; checkpoints and the result are safetensors artifacts, and the
result is an adapter ``Sample`` accepts by its id.

Held-out ``validation`` examples (seeds the training never sees) measure what the style costs:
every ``validate_every`` steps the adapter samples them, and a ``Validation`` event reports the
losses and, where the model has a classifier, how many images keep the base model's verdict.
``keep_best`` returns the adapter of the best validation loss; ``stop_when`` ends the run early.

A fine-tune is a *job* of the cluster (``cluster``): its id (``job-<32 hex>``, in every
checkpoint's metadata as ``run``) is sent first (``JobStarted``); it runs under a lease, so no
two replicas run it at once, and when its stream or replica is lost, ``resume_job`` continues it
on any replica from its newest checkpoint (the registry's, or the store's when the registry
forgot it).
"""

from __future__ import annotations

import contextlib
import re
import uuid

from dataclasses import dataclass, field
from typing import Any

import torch

from ..cluster import JobRecord
from ..core import SharedRows
from ..errors import (Cancelled, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound,
                      Unavailable)
from ..models._adapters import full_copy, trainable_state
from ..storage.artifacts import HEADER_BYTES
from ._context import TaskContext
from ._generation import prepare, run_sampler
from ._images import to_png
from ._job import Checkpoint, Job, JobStarted, ValidationReport
from ._objective import Objective
from ._optim import Patience, check_iterations, check_name, check_stop, make_optimizer, optimize
from ._specs import ExampleSpec, GenerationSpec, LossSpec
from ._work import check_work, finetune_work
from .compute_gradient import check_grad_mode, truncation
from .optimize_latent import OptimizeResult

__all__ = ["run_finetune_weights", "METHODS", "OPTIM_PREFIX"]

_JOB_ID = re.compile(r"(job-)?[0-9a-f]{32}")  # bare hex: runs from before jobs had a prefix

METHODS = ("lora", "full")
OPTIM_PREFIX = "__optim__/"  # optimizer state in a checkpoint: __optim__/<param>/<key>


def _checkpoint_tensors(model, opt) -> dict[str, torch.Tensor]:
    """The trained weights plus the optimizer's per-parameter state, so a resumed run continues
    exactly (Adam's moments and step count included)."""
    tensors = trainable_state(model)
    names = {id(p): n for n, p in model.named_parameters()}
    for param, state in opt.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIM_PREFIX}{names[id(param)]}/{key}"] = value.detach().to("cpu").reshape(value.shape)
    return tensors


def _restore(model, opt, tensors: dict[str, torch.Tensor]) -> None:
    """Put saved weights and optimizer state back (resume, keep_best); refuse what does not fit."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if name.startswith(OPTIM_PREFIX):
                pname, _, key = name[len(OPTIM_PREFIX):].rpartition("/")
                param = params.get(pname)
                if param is None:
                    raise FailedPrecondition(f"checkpoint optimizer state for unknown parameter {pname}")
                opt.state[param][key] = value.to(param.device)
            elif name in params and params[name].requires_grad:
                if params[name].shape != value.shape:
                    raise FailedPrecondition(f"checkpoint tensor {name} has shape {tuple(value.shape)}")
                params[name].copy_(value)
            else:
                raise FailedPrecondition(f"checkpoint tensor {name} does not fit this fine-tune")
    opt.sync_from_params()


def _examples_generation(ctx, spec: GenerationSpec, examples: list[ExampleSpec]) -> GenerationSpec:
    """All examples as one batch: x_T stacked (seeded ones drawn here) and their conditioning."""
    if not 1 <= len(examples) <= ctx.limits.max_examples:
        raise InvalidArgument(f"give 1…{ctx.limits.max_examples} examples; got {len(examples)}")
    _, backend = ctx.model(spec.model)
    states = []
    for k, ex in enumerate(examples):
        if ex.x_T is not None:
            if tuple(ex.x_T.shape) not in (tuple(backend.latent_shape), (1, *backend.latent_shape)):
                raise InvalidArgument(f"example {k}: x_T has shape {tuple(ex.x_T.shape)}; the model "
                                      f"takes {tuple(backend.latent_shape)}")
            states.append(ex.x_T.reshape(1, *backend.latent_shape).to(backend.device, backend.dtype))
        else:
            states.append(backend.noise(1, k if ex.seed is None else ex.seed))
    prompts = [ex.prompt for ex in examples]
    labels = [ex.label for ex in examples]
    if any(p for p in prompts) and any(lab is not None for lab in labels):
        raise InvalidArgument("examples give either prompts or labels, not both")
    if any(lab is None for lab in labels) and not all(lab is None for lab in labels):
        raise InvalidArgument("give a label for every example or for none")
    return GenerationSpec(model=spec.model, prompt=prompts if any(prompts) else [],
                          labels=[] if labels[0] is None else labels, x_T=torch.cat(states),
                          steps=spec.steps, solver=spec.solver, guidance_scale=spec.guidance_scale,
                          grid=spec.grid)


def run_finetune_weights(ctx: TaskContext, spec: GenerationSpec, examples: list[ExampleSpec],
                         losses: list[LossSpec], job: Job, opts,
                         validation: list[ExampleSpec] = ()) -> OptimizeResult:
    """FinetuneWeights with the request's options ``opts``; ``validation``: held-out examples.
    ``keep_checkpoints``: this run's newest checkpoints kept, older ones deleted (quota)."""
    mode = _check_request(ctx, spec, opts, validation)
    record, resume_from = _job_of(ctx, opts)
    prep = prepare(ctx, _examples_generation(ctx, spec, examples))
    check_work(ctx.limits, finetune_work(prep.steps, prep.solver, mode, opts.iterations,
                                         opts.validate_every, bool(validation)))
    model, meta = _adapted_copy(ctx, prep, opts)
    meta["run"] = record.id
    run = _Run(ctx, job, opts, prep, model, meta, mode, record=record, resume_from=resume_from)
    with ctx.artifacts.reserve(_reserved_bytes(run.params, opts.keep_checkpoints)):
        record.model = prep.model
        ctx.cluster.claim(record)  # FAILED_PRECONDITION while a live replica runs it
        try:
            job.emit(JobStarted(record.id, record.replica, record.iteration))
            result = _train(run, spec, losses, validation)
        except BaseException:
            ctx.cluster.release(record, "stopped")  # resumable by id
            raise
        record.adapter = result.artifact.id
        ctx.cluster.release(record, "done")
        return result


def _job_of(ctx: TaskContext, opts) -> tuple[JobRecord, str]:
    """The job this request runs, and the checkpoint it starts from: a new one; the job a
    checkpoint belongs to (``resume_from``); or a job by id (``resume_job``) at its newest
    checkpoint — the registry's, else the newest in the store (a registry that forgot it: one
    replica restarted, a Redis that lost its memory). NOT_FOUND for another tenant's job."""
    if not opts.resume_job:
        if not opts.resume_from:
            return JobRecord(id=f"job-{uuid.uuid4().hex}", tenant=ctx.tenant), ""
        info = ctx.artifacts.info(opts.resume_from)
        if info.kind != "checkpoint":
            raise InvalidArgument(f"resume_from must be a checkpoint; {info.id} is a {info.kind}")
        run = str(info.metadata.get("run") or info.id)
        return JobRecord(id=run, tenant=ctx.tenant, checkpoint=info.id, iteration=info.iteration), info.id
    job_id = opts.resume_job
    if not _JOB_ID.fullmatch(job_id):
        raise InvalidArgument("resume_job is not a job id (expected job-<32 hex>, from the Job event)")
    if opts.resume_from:
        raise InvalidArgument("give resume_job or resume_from, not both")
    unknown = NotFound(f"no job {job_id} to resume (a job is known once it has started; one "
                       "that never wrote a checkpoint and outlived the registry starts anew)")
    record = ctx.cluster.job(job_id)
    if record is not None and record.tenant != ctx.tenant:
        raise unknown  # another tenant's: as if missing
    if record is not None and record.state == "done":
        raise FailedPrecondition(f"job {job_id} has finished; its adapter is {record.adapter}")
    newest = max((i for i in ctx.artifacts.list(kind="checkpoint")
                  if i.metadata.get("run") == job_id), key=lambda i: (i.iteration, i.created),
                 default=None)
    if record is None and newest is None:
        raise unknown
    record = record or JobRecord(id=job_id, tenant=ctx.tenant)
    checkpoint = newest.id if newest is not None else ""
    record.checkpoint, record.iteration = checkpoint, newest.iteration if newest is not None else 0
    return record, checkpoint


def _check_request(ctx: TaskContext, spec: GenerationSpec, opts, validation) -> str:
    """Refuse a malformed request before any work; returns the grad mode it asks for."""
    check_iterations(opts, ctx.limits)
    check_stop(opts.stop_when, ctx.limits)
    if opts.keep_best and not validation:
        raise InvalidArgument("keep_best needs validation examples")
    if not 1 <= opts.validate_every <= ctx.limits.max_iterations:
        raise InvalidArgument(f"validate_every must lie in 1…{ctx.limits.max_iterations}")
    mode = check_grad_mode(opts.grad_mode)
    truncation(opts)  # its bounds, before any work
    check_name(opts.name)
    if not 1 <= opts.keep_checkpoints <= 100:
        raise InvalidArgument(f"keep_checkpoints must lie in 1…100; got {opts.keep_checkpoints}")
    if opts.method not in METHODS:
        raise InvalidArgument(f"method must be lora or full; got {opts.method!r}")
    if spec.adapter:
        raise InvalidArgument("fine-tuning starts from the base model; adapter must be empty")
    if opts.method == "lora" and opts.lora_rank > ctx.limits.max_lora_rank:
        raise InvalidArgument(f"lora_rank must be at most {ctx.limits.max_lora_rank}")
    return mode


def _adapted_copy(ctx, prep, opts) -> tuple[torch.nn.Module, dict]:
    """What trains — a LoRA adapter in the model's bank (its calls batch with other requests'),
    or a full copy; the resident model is never touched — and the metadata a resume must match."""
    lora = opts.method == "lora"
    targets = tuple(opts.target_modules) or prep.backend.lora_targets
    try:
        model = (ctx.new_lora(prep.model, opts.lora_rank or 4, opts.lora_alpha or None, targets)
                 if lora else full_copy(prep.eps_fn))
    except ValueError as err:
        raise InvalidArgument(f"model {prep.model!r}: {err}") from err
    meta = {"method": opts.method, "rank": (opts.lora_rank or 4) if lora else 0,
            "alpha": (opts.lora_alpha or None) if lora else None,
            "targets": list(targets) if lora else [], "name": opts.name}
    return model, meta


def _reserved_bytes(params, keep_checkpoints: int) -> int:
    """Bytes to reserve up front, so a run whose artifacts cannot fit is refused before any work.

    Up to keep + 1 checkpoints at once (weights and two optimizer moments each, the moments in
    float32 whatever the weights' dtype: MasterOptimizer), then the adapter. The bytes stay
    reserved until the run ends, so concurrent runs cannot all pass this check and fail at a
    checkpoint."""
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    moment_bytes = sum(p.numel() * max(4, p.element_size()) for p in params)
    checkpoint = weight_bytes + 2 * moment_bytes + HEADER_BYTES
    return (keep_checkpoints + 1) * checkpoint + weight_bytes + HEADER_BYTES


def _train(run: _Run, spec: GenerationSpec, losses: list[LossSpec], validation) -> OptimizeResult:
    """The run itself, once admitted (its artifacts' bytes reserved)."""
    _start(run, spec, losses, validation)
    try:
        optimize(run.job, run.opt, run.params, run.opts, run.loss_at, first=run.first,
                 history=run.history, after_step=run.after_step, backward_turn=run.backward_turn)
    except (Cancelled, DeadlineExceeded):
        if len(run.history) > run.first:
            run.checkpoint(len(run.history))  # durable: a stopped fine-tune resumes from here
        raise
    return _finish(run)


def _start(run: _Run, spec: GenerationSpec, losses: list[LossSpec], validation) -> None:
    """What training measures against: the base model's outputs (the content reference), the
    held-out validator, the optimizer, and a resumed checkpoint's state."""
    with torch.no_grad():
        x0_base = run_sampler(run.prep, run.job, grad_mode="none")
        run.reference = {"latent": x0_base, "image": run.prep.backend.decode(x0_base)}
    run.objective = Objective(run.ctx, run.prep.backend, losses, run.job, reference=run.reference)
    run.validator = _Validator(run.ctx, spec, validation, losses, run.job) if validation else None
    run.opt = make_optimizer(run.opts, run.params)
    if run.resume_from:
        run.history, run.first = _resume(run)
        run.kept = _checkpoints_of(run)
        run.prune()


def _finish(run: _Run) -> OptimizeResult:
    """Save the adapter (the best validated one under keep_best) and sample with it for the reply."""
    if run.best_state is not None:
        _restore(run.model, run.opt, run.best_state)
    done = run.best_done if run.opts.keep_best else len(run.history)
    info = run.ctx.artifacts.save(run.opts.method, trainable_state(run.model), model=run.prep.model,
                                  name=run.opts.name, iteration=done,
                                  metadata={**run.meta, "history": run.history})
    run.model.requires_grad_(False)
    with torch.no_grad():
        run.objective.set_reference(run.reference)
        x0 = run_sampler(run.prep, run.job, eps_fn=run.model, grad_mode="none",
                         iteration=len(run.history))
        images = run.prep.backend.decode(x0)
    return OptimizeResult(run.history[-1], run.history, run.prep.x_T, x0, to_png(images),
                          to_png(run.reference["image"]), info, best_iteration=[done],
                          iterations_run=len(run.history))


@dataclass(eq=False)
class _Run:
    """One admitted fine-tune: the state its steps share, and the steps ``optimize`` calls back."""

    ctx: TaskContext
    job: Job
    opts: Any
    prep: Any
    model: torch.nn.Module
    meta: dict  # method, rank, alpha, targets, name: on every checkpoint and the adapter
    mode: str  # the grad mode
    record: JobRecord | None = None  # the job as the cluster knows it
    resume_from: str = ""  # the checkpoint it continues
    params: list = field(init=False)
    patience: Patience = field(init=False)
    reference: dict | None = None  # the base model's outputs on the examples
    objective: Objective | None = None
    validator: _Validator | None = None
    opt: Any = None
    history: list = field(default_factory=list)  # the training loss per iteration
    first: int = 0  # the iteration this run starts at (a resumed checkpoint's)
    kept: list = field(default_factory=list)  # this run's checkpoint ids, oldest first
    best_done: int = 0
    best_state: dict | None = None  # under keep_best: the best validated weights

    def __post_init__(self):
        """Derived once from the copy and the request: what trains, and when to stop early."""
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.patience = Patience(self.opts.stop_when)

    def backward_turn(self):
        """The backward pass through kept graphs runs in this job's thread: it holds the
        engine's device for its duration, a turn of the fair share like a network call. An
        adapter of the bank that keeps no graphs (``checkpoint``, ``adjoint``, or ``auto`` while
        calls are shared) makes its backward calls through the engine, batched with others'."""
        engine = self.prep.engine
        if engine is None:
            return contextlib.nullcontext()
        if isinstance(self.model, SharedRows) and (
                self.mode in ("checkpoint", "adjoint") or (self.mode == "auto" and engine.shares_calls(self.job))):
            return contextlib.nullcontext()
        return engine.exclusive(self.job)

    def loss_at(self, it: int):
        """One iteration's loss: the sampler through the copy on this iteration's minibatch."""
        prep, n = self.prep, self.prep.batch
        size = min(self.opts.batch_size or n, n)
        idx = torch.arange(it * size, (it + 1) * size) % n
        self.objective.iteration = it
        self.objective.set_reference({k: v[idx] for k, v in self.reference.items()})
        cond = prep.cond[idx] if isinstance(prep.cond, torch.Tensor) else prep.cond
        uncond = prep.uncond[idx] if isinstance(prep.uncond, torch.Tensor) else prep.uncond
        x0 = run_sampler(prep, self.job, x_T=prep.x_T[idx], cond=cond, eps_fn=self.model,
                         grad_mode=self.mode, memory_budget_mib=self.opts.memory_budget_mib,
                         iteration=it, uncond=uncond, truncate=truncation(self.opts, it))
        return self.objective(x0), None, {}

    def checkpoint(self, done: int) -> None:
        """A resumable point (weights, optimizer state, history); only the newest few are kept."""
        info = self.ctx.artifacts.save("checkpoint", _checkpoint_tensors(self.model, self.opt),
                                       model=self.prep.model, name=self.opts.name, iteration=done,
                                       metadata={**self.meta, "history": self.history})
        self.job.emit(Checkpoint(info))
        self.kept.append(info.id)
        if self.record is not None:
            self.record.checkpoint, self.record.iteration = info.id, done
            self.ctx.cluster.update(self.record)
        self.prune()

    def prune(self) -> None:
        """Only this run's newest ``keep_checkpoints`` stay: those of a crashed or stopped run
        it resumed included (the run id is in each checkpoint's metadata, in the store)."""
        while len(self.kept) > self.opts.keep_checkpoints:
            try:
                self.ctx.artifacts.delete(self.kept.pop(0))
            except NotFound:
                pass  # deleted meanwhile (DeleteArtifact)

    def after_step(self, done: int) -> bool:
        """Checkpoint when due or asked, validate when due; True stops the run early."""
        opts = self.opts
        if self.record is not None and self.ctx.cluster.lease_lost(self.record.id):
            raise Unavailable(f"this replica lost the lease of job {self.record.id} (another may run "
                              "it now); resume it by id (resume_job)")
        periodic = opts.checkpoint_every and done % opts.checkpoint_every == 0
        if done < opts.iterations and (periodic or self.job.checkpoint_now.is_set()):
            self.job.checkpoint_now.clear()
            self.checkpoint(done)
        if self.validator is None:
            return self.patience.update(self.history[-1])  # the training loss (before this step)
        if done % opts.validate_every and done < opts.iterations:
            return False
        self.validator(self.model, done, self.patience)
        if self.patience.improved:
            self.best_done = done
            if opts.keep_best:
                self.best_state = {k: v.clone() for k, v in trainable_state(self.model).items()}
        return self.patience.stop_now


class _Validator:
    """The held-out examples: the base model's outputs (the content reference, the verdicts to
    keep), then ``validator(model, done, patience) → validation loss`` emitting a Validation event."""

    def __init__(self, ctx, spec, validation, losses, job):
        self.job = job
        self.prep = prepare(ctx, _examples_generation(ctx, spec, list(validation)))
        backend = self.prep.backend
        with torch.no_grad():
            x0 = run_sampler(self.prep, job, grad_mode="none")
            images = backend.decode(x0)
            self.verdicts = backend.classify(images).argmax(1) if backend.has_classifier else None
        self.objective = Objective(ctx, backend, losses, job,
                                   reference={"latent": x0, "image": images})
        self.png_budget = ctx.limits.max_message_bytes // 2

    def __call__(self, model, done: int, patience: Patience) -> float:
        backend = self.prep.backend
        with torch.no_grad():
            self.objective.iteration = done
            x0 = run_sampler(self.prep, self.job, eps_fn=model, grad_mode="none", iteration=done)
            images = backend.decode(x0)
            total, values, _ = self.objective(x0, images)
            agreement = (None if self.verdicts is None else
                         float((backend.classify(images).argmax(1) == self.verdicts).float().mean()))
        loss = float(total)
        patience.update(loss)
        pngs = to_png(images)
        if sum(map(len, pngs)) > self.png_budget:
            pngs = []  # the event stays within a message; the figures matter more
        self.job.emit(ValidationReport(done, loss, values, agreement, pngs, patience.improved))
        return loss


def _resume(run: _Run) -> tuple[list, int]:
    """Load a checkpoint of the same run: weights, optimizer state, loss history so far."""
    ctx, checkpoint_id, model_name, meta = run.ctx, run.resume_from, run.prep.model, run.meta
    tensors, info = ctx.artifacts.load(checkpoint_id)
    if info.kind != "checkpoint":
        raise InvalidArgument(f"resume_from must be a checkpoint; {checkpoint_id} is a {info.kind}")
    if info.model != model_name:
        raise FailedPrecondition(f"checkpoint {checkpoint_id} belongs to model {info.model!r}")
    for key in ("method", "rank", "alpha", "targets"):
        if info.metadata.get(key) != meta.get(key):
            raise FailedPrecondition(f"checkpoint {checkpoint_id} was made with {key}="
                                     f"{info.metadata.get(key)!r}, this request has {meta.get(key)!r}")
    if info.iteration >= run.opts.iterations:
        raise InvalidArgument(f"checkpoint {checkpoint_id} is at iteration {info.iteration}; "
                              f"ask for more than that many iterations")
    _restore(run.model, run.opt, tensors)
    history = [float(v) for v in info.metadata.get("history", [])][:info.iteration]
    return history, info.iteration


def _checkpoints_of(run: _Run) -> list[str]:
    """The run's checkpoints in the store, oldest first (by iteration, then time)."""
    mine = [i for i in run.ctx.artifacts.list(kind="checkpoint", model=run.prep.model)
            if i.metadata.get("run") == run.meta["run"] or i.id == run.resume_from]
    return [i.id for i in sorted(mine, key=lambda i: (i.iteration, i.created))]
