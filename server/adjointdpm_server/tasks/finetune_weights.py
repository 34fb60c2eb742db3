"""FinetuneWeights: LoRA or full fine-tuning of the model on a loss over (noise, prompt) examples.

The paper's stylization (§4.2, eq. 13: a Gram style term plus a content term that keeps each
example close to what the base model made of it — ``reference`` below). Works on a copy: the
resident model is never modified; checkpoints and the result are safetensors artifacts, and the
result is an adapter ``Sample`` accepts by its id.

Held-out ``validation`` examples (seeds the training never sees) measure what the style costs:
every ``validate_every`` steps the adapter samples them, and a ``Validation`` event reports the
losses and, where the model has a classifier, how many images keep the base model's verdict.
``keep_best`` returns the adapter of the best validation loss; ``stop_when`` ends the run early.

A *prompt set* (``conditions``, instead of ``examples``: reward fine-tuning in the manner of
DRaFT and AlignProp) is a list of prompts or class labels with weights. Iteration ``it`` draws
``batch_size`` of them with replacement, in proportion to the weights, and a fresh noise for each
drawn sample, from a generator seeded by ``(seed, it)`` alone (``draw_conditions``): the stream of
batches is the same on every run and on a resume from any checkpoint, whose metadata records what
a resume must repeat (``STREAM_KEYS``). Each distinct condition is encoded once, before any work.
Losses that read the base model's output (``LossPlugin.uses_reference``: gram_style's content
term) get it for each drawn batch, sampled by the base model from the same noises. Losses that
default to a sample's own prompt or label (``preference``, ``classifier`` without theirs) get
each pass's drawn conditions (``Objective.set_conditions``), as examples get each example's.

``micro_batch`` (either kind of input) splits an iteration's batch into sampler passes whose
gradients accumulate before the one optimizer step: the objective is a sum over samples, so the
step is the whole batch's whatever the split, and the memory is one pass's.

A fine-tune is a *job* of the cluster (``cluster``): its id (``job-<32 hex>``, in every
checkpoint's metadata as ``run``) is sent first (``JobStarted``); it runs under a lease, so no
two replicas run it at once, and when its stream or replica is lost, ``resume_job`` continues it
on any replica from its newest checkpoint (the registry's, or the store's when the registry
forgot it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import uuid

from dataclasses import dataclass, field
from typing import Any

import torch

from ..cluster import JobRecord
from ..core import SharedRows
from ..errors import (Cancelled, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound,
                      Unavailable)
from ..losses import Conditions
from ..models._adapters import full_copy, trainable_state
from ..storage.artifacts import HEADER_BYTES
from ._context import TaskContext
from ._generation import decoder_budget, prepare, run_sampler
from ._images import to_png
from ._job import Checkpoint, Job, JobStarted, ValidationReport
from ._objective import Objective, generation_conditions, sample_conditions
from ._optim import Patience, check_iterations, check_name, check_stop, make_optimizer, optimize
from ._specs import ConditionSpec, ExampleSpec, GenerationSpec, LossSpec
from ._work import check_work, finetune_work
from .compute_gradient import check_grad_mode, truncation
from .optimize_latent import OptimizeResult

__all__ = ["run_finetune_weights", "METHODS", "OPTIM_PREFIX", "STREAM_KEYS", "draw_conditions",
           "stream_key"]

_JOB_ID = re.compile(r"(job-)?[0-9a-f]{32}")  # bare hex: runs from before jobs had a prefix

METHODS = ("lora", "full")
OPTIM_PREFIX = "__optim__/"  # optimizer state in a checkpoint: __optim__/<param>/<key>
# What a checkpoint records of its stream of batches, and a resume must repeat: the prompt set's
# digest and seed (prompt sets only) and the samples an iteration. Not ``micro_batch``: it splits
# the same batch into passes (memory, not the stream), so a resume may split it differently.
STREAM_KEYS = ("conditions", "seed", "batch_size")


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


def stream_key(seed: int, iteration) -> int:
    """The 64-bit seed of a torch generator for ``(seed, iteration)`` of a prompt set's stream
    (``iteration``: an int, or ``"result"`` for the result's samples): BLAKE2b of both, so
    neighbouring seeds and iterations get unrelated streams."""
    data = f"adjointdpm/conditions/{int(seed)}/{iteration}".encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def draw_conditions(weights, size: int, seed: int, iteration: int,
                    latent_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Iteration ``iteration``'s mini-batch of a prompt set: ``size`` indices into ``weights``,
    drawn with replacement with chances proportional to them (a weight 0 is never drawn), then
    one noise x_T ~ N(0, I) of ``latent_shape`` per drawn sample (float32 on the CPU, as
    ``ModelBackend.noise``). Both come from one CPU ``torch.Generator`` seeded by
    ``stream_key(seed, iteration)``: a function of (seed, iteration, weights, size) alone, so the
    same on every run, every device and every resume."""
    gen = torch.Generator().manual_seed(stream_key(seed, iteration))
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    picks = torch.multinomial(w / w.max(), size, replacement=True, generator=gen)
    noise = torch.randn((size, *latent_shape), generator=gen, dtype=torch.float32)
    return picks, noise


@dataclass
class _PromptSet:
    """A prompt set, checked and encoded: each distinct condition's conditioning once (a row of
    ``cond``/``uncond``), ``row[k]`` the row of the k-th listed condition, and the prepared
    result batch (the distinct conditions up to the server's max batch, one seeded noise each)."""

    weights: list[float]
    row: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor | None
    display: Any  # Prepared
    digest: str
    seed: int
    conditions: Conditions  # the k-th listed condition's prompt or label, as loss terms see it

    def batch(self, it: int, size: int):
        """Iteration ``it``'s x_T, cond, uncond and each drawn sample's condition
        (``draw_conditions``)."""
        backend = self.display.backend
        picks, noise = draw_conditions(self.weights, size, self.seed, it, backend.latent_shape)
        rows = self.row[picks]
        uncond = None if self.uncond is None else self.uncond[rows.to(self.uncond.device)]
        return (noise.to(backend.device, backend.dtype), self.cond[rows.to(self.cond.device)],
                uncond, self.conditions.rows(picks))


def _prompt_set(ctx, spec: GenerationSpec, conditions: list[ConditionSpec], seed: int) -> _PromptSet:
    """Check the conditions and encode each distinct one (every prompt or label is checked
    against the model here, before any work); INVALID_ARGUMENT naming what is wrong."""
    weights, by_label = _check_conditions(conditions, ctx.limits)
    rows: dict = {}  # the distinct conditions, in order of first appearance → their row
    row = [rows.setdefault(c.label if by_label else c.prompt, len(rows)) for c in conditions]
    conds, unconds, display = _encode(ctx, spec, list(rows), by_label, seed)
    canonical = [[c.prompt, c.label, w] for c, w in zip(conditions, weights)]
    digest = hashlib.sha256(json.dumps(canonical, ensure_ascii=False).encode()).hexdigest()
    listed = sample_conditions(display.backend, labels=[c.label for c in conditions] if by_label else (),
                               prompts=() if by_label else [c.prompt for c in conditions])
    return _PromptSet(weights, torch.tensor(row), torch.cat(conds),
                      None if any(u is None for u in unconds) else torch.cat(unconds),
                      display, digest, seed, listed)


def _check_conditions(conditions: list[ConditionSpec], limits) -> tuple[list[float], bool]:
    """(the weights, whether the conditions are labels): at most ``max_examples`` of them, each a
    prompt or a label (all of one kind), weights finite, ≥ 0 and not all 0."""
    if not 1 <= len(conditions) <= limits.max_examples:
        raise InvalidArgument(f"give 1…{limits.max_examples} conditions; got {len(conditions)}")
    weights = []
    for k, c in enumerate(conditions):
        w = float(c.weight)
        if not (math.isfinite(w) and w >= 0):
            raise InvalidArgument(f"conditions[{k}].weight must be finite and ≥ 0 (a relative "
                                  f"chance of being drawn); got {w}")
        if c.prompt and c.label is not None:
            raise InvalidArgument(f"conditions[{k}] gives a prompt and a label; give one")
        weights.append(w)
    if not any(w > 0 for w in weights):
        raise InvalidArgument("every condition's weight is 0: nothing can be drawn (give at least "
                              "one a positive weight)")
    labels = [c.label is not None for c in conditions]
    if any(labels) and not all(labels):
        raise InvalidArgument("conditions give either prompts or labels, not both")
    return weights, labels[0]


def _encode(ctx, spec: GenerationSpec, distinct: list, by_label: bool, seed: int):
    """The conditioning of each distinct condition, prepared (``prepare``: checked, encoded,
    guided) in chunks of the server's max batch; the first chunk, with one seeded noise each, is
    the result's batch. → (conds, unconds, the first chunk's Prepared)."""
    limits = ctx.limits
    _, backend = ctx.model(spec.model)
    conds, unconds, display = [], [], None
    for start in range(0, len(distinct), limits.max_batch):
        chunk = distinct[start:start + limits.max_batch]
        if start == 0:  # the result's batch: these conditions, one seeded noise each
            gen = torch.Generator().manual_seed(stream_key(seed, "result"))
            x_T = torch.randn((len(chunk), *backend.latent_shape), generator=gen, dtype=torch.float32)
        else:
            x_T = torch.zeros((len(chunk), *backend.latent_shape))
        prep = prepare(ctx, GenerationSpec(
            model=spec.model, prompt=[] if by_label else list(chunk),
            labels=list(chunk) if by_label else [], x_T=x_T, steps=spec.steps, solver=spec.solver,
            guidance_scale=spec.guidance_scale, grid=spec.grid))
        if not isinstance(prep.cond, torch.Tensor) or not (
                prep.uncond is None or isinstance(prep.uncond, torch.Tensor)):
            raise InvalidArgument(f"model {prep.model!r}: its conditioning cannot be drawn per "
                                  "sample; give examples instead of conditions")
        if display is None:
            display = prep
        conds.append(prep.cond)
        unconds.append(prep.uncond)
    return conds, unconds, display


def _batch_sizes(limits, opts, n: int, *, prompt_set: bool) -> tuple[int, int]:
    """(samples an iteration, samples a sampler pass). Examples: ``batch_size`` of the ``n``
    (unset: all); a prompt set: ``batch_size`` draws (unset: ``n``, at most the server's max
    batch), at most the server's ``max_examples``. ``micro_batch`` (unset: the whole batch) is
    at most the batch, as it is a cap: a larger one means one pass. A pass holds at most the
    server's max batch."""
    if prompt_set:
        size = opts.batch_size or min(n, limits.max_batch)
        if size > limits.max_examples:
            raise InvalidArgument(f"batch_size must be at most {limits.max_examples} (the server's "
                                  f"limit of samples an iteration); got {size}")
    else:
        size = min(opts.batch_size or n, n)
    micro = min(opts.micro_batch or size, size)
    if micro > limits.max_batch:
        raise InvalidArgument(f"a sampler pass takes at most {limits.max_batch} samples (the "
                              f"server's max batch): give micro_batch ≤ {limits.max_batch} to run "
                              f"batch_size {size} in passes")
    return size, micro


def run_finetune_weights(ctx: TaskContext, spec: GenerationSpec, examples: list[ExampleSpec],
                         losses: list[LossSpec], job: Job, opts, validation: list[ExampleSpec] = (),
                         *, conditions: list[ConditionSpec] = ()) -> OptimizeResult:
    """FinetuneWeights with the request's options ``opts``; ``validation``: held-out examples;
    ``conditions``: a prompt set to draw every iteration's batch from, instead of ``examples``.
    ``keep_checkpoints``: this run's newest checkpoints kept, older ones deleted (quota)."""
    mode = _check_request(ctx, spec, opts, validation, examples, conditions)
    record, resume_from = _job_of(ctx, opts)
    prep, prompts, samples, size, micro = _inputs(ctx, spec, examples, conditions, opts)
    # its terms checked before any work: of the samples' conditions, the kind (each pass sets
    # the values of its own samples)
    objective = Objective(ctx, prep.backend, losses, job, conditions=Conditions(samples.kind))
    references = prompts is not None and objective.needs_reference
    check_work(ctx.limits, finetune_work(prep.steps, prep.solver, mode, opts.iterations,
                                         opts.validate_every, bool(validation),
                                         passes=-(-size // micro), references=references))
    # the held-out examples prepared and their terms checked before any work too: their
    # conditions (their own prompts or labels) may be of another kind than the training's
    validator = _Validator(ctx, spec, validation, losses, job) if validation else None
    objective.plan_decoder(micro, decoder_budget(prep, job, opts.memory_budget_mib), opts.decoder_tile)
    model, meta = _adapted_copy(ctx, prep, opts)
    meta["run"] = record.id
    meta.update(batch_size=size, micro_batch=micro)
    if prompts is not None:  # the seed as text: exact in JSON and in a client's Struct
        meta.update(conditions=prompts.digest, seed=str(prompts.seed))
    run = _Run(ctx, job, opts, prep, model, meta, mode, record=record, resume_from=resume_from,
               objective=objective, prompts=prompts, size=size, micro=micro,
               references=references, conditions=samples, validator=validator)
    with ctx.artifacts.reserve(_reserved_bytes(run.params, opts.keep_checkpoints)):
        record.model = prep.model
        ctx.cluster.claim(record)  # FAILED_PRECONDITION while a live replica runs it
        try:
            job.emit(JobStarted(record.id, record.replica, record.iteration))
            result = _train(run)
        except BaseException:
            ctx.cluster.release(record, "stopped")  # resumable by id
            raise
        record.adapter = result.artifact.id
        ctx.cluster.release(record, "done")
        return result


def _inputs(ctx, spec: GenerationSpec, examples, conditions, opts):
    """(the prepared batch — the examples, or a prompt set's result batch —, the prompt set or
    None, what the samples are generated from — each example's prompt or label, or each listed
    condition's —, samples an iteration, samples a pass)."""
    if conditions:
        prompts = _prompt_set(ctx, spec, list(conditions), opts.seed)
        return (prompts.display, prompts, prompts.conditions,
                *_batch_sizes(ctx.limits, opts, len(conditions), prompt_set=True))
    generation = _examples_generation(ctx, spec, examples)
    prep = prepare(ctx, generation)
    return (prep, None, generation_conditions(generation, prep),
            *_batch_sizes(ctx.limits, opts, prep.batch, prompt_set=False))


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


def _check_request(ctx: TaskContext, spec: GenerationSpec, opts, validation, examples=(),
                   conditions=()) -> str:
    """Refuse a malformed request before any work; returns the grad mode it asks for."""
    if examples and conditions:
        raise InvalidArgument("give examples (fixed noises and conditions) or conditions (a prompt "
                              "set drawn from every iteration), not both")
    if not examples and not conditions:
        raise InvalidArgument("give examples (fixed noises and conditions) or conditions (a prompt "
                              "set drawn from every iteration) to fine-tune on")
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


def _train(run: _Run) -> OptimizeResult:
    """The run itself, once admitted (its artifacts' bytes reserved)."""
    _start(run)
    try:
        optimize(run.job, run.opt, run.params, run.opts, run.loss_at, first=run.first,
                 history=run.history, after_step=run.after_step, backward_turn=run.backward_turn)
    except (Cancelled, DeadlineExceeded):
        if len(run.history) > run.first:
            run.checkpoint(len(run.history))  # durable: a stopped fine-tune resumes from here
        raise
    return _finish(run)


def _start(run: _Run) -> None:
    """What training measures against: the base model's outputs (the examples' content
    reference; a prompt set's result batch before training), the held-out validator's, the
    optimizer, and a resumed checkpoint's state."""
    with torch.no_grad():
        x0_base = run_sampler(run.prep, run.job, grad_mode="none")
        run.reference = {"latent": x0_base, "image": run.objective.reference_image(x0_base)}
    run.objective.set_reference(run.reference if run.prompts is None else None)
    if run.validator is not None:
        run.validator.start()
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
    objective: Objective | None = None
    prompts: _PromptSet | None = None  # a prompt set, or None: the examples (prep's batch)
    size: int = 1  # samples an iteration
    micro: int = 1  # samples a sampler pass
    references: bool = False  # a prompt set's losses read the base model's output on each batch
    # what the samples are generated from: the examples' (prep's rows), or the listed conditions'
    conditions: Conditions = field(default_factory=Conditions)
    params: list = field(init=False)
    patience: Patience = field(init=False)
    reference: dict | None = None  # the base model's outputs on the examples (the result batch)
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

    def batch(self, it: int):
        """Iteration ``it``'s batch: x_T, cond, uncond, the content reference (None: none
        precomputed) and each sample's condition (``Conditions``). Examples: ``size`` of them in
        turn; a prompt set: drawn by (seed, it)."""
        if self.prompts is not None:
            x_T, cond, uncond, conditions = self.prompts.batch(it, self.size)
            return x_T, cond, uncond, None, conditions
        prep, n = self.prep, self.prep.batch
        idx = torch.arange(it * self.size, (it + 1) * self.size) % n
        return (prep.x_T[idx], _rows(prep.cond, idx), _rows(prep.uncond, idx),
                {k: v[idx] for k, v in self.reference.items()}, self.conditions.rows(idx))

    def loss_at(self, it: int):
        """One iteration's loss: the sampler through the copy on this iteration's batch, in
        passes of ``micro`` samples whose gradients ``optimize`` accumulates."""
        self.objective.iteration = it
        return self._passes(it, *self.batch(it)), None, {}

    def _passes(self, it: int, x_T, cond, uncond, reference, conditions):
        """Each pass's evaluation, computed when ``optimize`` asks for it (after the previous
        pass's backward): at most one pass's graph is alive."""
        prep = self.prep
        for start in range(0, len(x_T), self.micro):
            part = slice(start, start + self.micro)
            x, c, u = x_T[part], _rows(cond, part), _rows(uncond, part)
            self.objective.set_conditions(conditions.rows(part))  # this pass's own prompts or labels
            if reference is not None:
                self.objective.set_reference({k: v[part] for k, v in reference.items()})
            elif self.references:  # the base model's output on this drawn pass, same noise
                with torch.no_grad():
                    base = run_sampler(prep, self.job, x_T=x, cond=c, uncond=u, grad_mode="none",
                                       iteration=it)
                    image = self.objective.reference_image(base)
                    self.objective.set_reference({"latent": base, "image": image})
            x0 = run_sampler(prep, self.job, x_T=x, cond=c, eps_fn=self.model,
                             grad_mode=self.mode, memory_budget_mib=self.opts.memory_budget_mib,
                             iteration=it, uncond=u, truncate=truncation(self.opts, it))
            yield self.objective(x0)

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


def _rows(value, index):
    """The rows ``index`` (a tensor or a slice) of a batched tensor; anything else as it is."""
    return value[index] if isinstance(value, torch.Tensor) else value


class _Validator:
    """The held-out examples, prepared and their loss terms built (checked) before any work,
    scored against their own prompts or labels where a term defaults to them; ``start``: the
    base model's outputs (the content reference, the verdicts to keep); then
    ``validator(model, done, patience) → validation loss`` emitting a Validation event."""

    def __init__(self, ctx, spec, validation, losses, job):
        self.job = job
        generation = _examples_generation(ctx, spec, list(validation))
        self.prep = prepare(ctx, generation)
        self.objective = Objective(ctx, self.prep.backend, losses, job,
                                   conditions=generation_conditions(generation, self.prep))
        self.verdicts = None
        self.png_budget = ctx.limits.max_message_bytes // 2

    def start(self) -> None:
        """The base model's outputs on the held-out examples: the reference and the verdicts."""
        backend = self.prep.backend
        with torch.no_grad():
            x0 = run_sampler(self.prep, self.job, grad_mode="none")
            images = backend.decode(x0)
            self.verdicts = backend.classify(images).argmax(1) if backend.has_classifier else None
        self.objective.set_reference({"latent": x0, "image": images})

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
    for key in STREAM_KEYS:  # the stream of batches must go on as it was
        if key not in info.metadata and "conditions" not in meta:
            continue  # examples, and a checkpoint from before the stream was recorded
        theirs, mine = info.metadata.get(key), meta.get(key)
        if theirs != mine:
            what = (f"{_inputs_of(theirs)}, this request has {_inputs_of(mine)}"
                    if key == "conditions" else f"{key}={theirs!r}, this request has {mine!r}")
            raise FailedPrecondition(f"checkpoint {checkpoint_id} was made with {what}: a resume "
                                     "repeats the run's examples or conditions, seed and "
                                     "batch_size (micro_batch may differ)")
    if info.iteration >= run.opts.iterations:
        raise InvalidArgument(f"checkpoint {checkpoint_id} is at iteration {info.iteration}; "
                              f"ask for more than that many iterations")
    _restore(run.model, run.opt, tensors)
    history = [float(v) for v in info.metadata.get("history", [])][:info.iteration]
    return history, info.iteration


def _inputs_of(digest) -> str:
    return "examples" if digest is None else f"the prompt set {str(digest)[:12]}…"


def _checkpoints_of(run: _Run) -> list[str]:
    """The run's checkpoints in the store, oldest first (by iteration, then time)."""
    mine = [i for i in run.ctx.artifacts.list(kind="checkpoint", model=run.prep.model)
            if i.metadata.get("run") == run.meta["run"] or i.id == run.resume_from]
    return [i.id for i in sorted(mine, key=lambda i: (i.iteration, i.created))]
