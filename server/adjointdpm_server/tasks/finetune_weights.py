"""FinetuneWeights: LoRA or full fine-tuning of the model on a loss over (noise, prompt) examples.

The paper's stylization (§4.2, eq. 13: a Gram style term plus a content term that keeps each
example close to what the base model made of it — ``reference`` below). Works on a copy: the
resident model is never modified; checkpoints and the result are safetensors artifacts, and the
result is an adapter ``Sample`` accepts by its id.

Held-out ``validation`` examples (seeds the training never sees) measure what the style costs:
every ``validate_every`` steps the adapter samples them, and a ``Validation`` event reports the
losses and, where the model has a classifier, how many images keep the base model's verdict.
``keep_best`` returns the adapter of the best validation loss; ``stop_when`` ends the run early.
"""

from __future__ import annotations

import torch

from ..errors import Cancelled, DeadlineExceeded, FailedPrecondition, InvalidArgument
from ..models._adapters import full_copy, trainable_state, with_lora
from ..storage.artifacts import HEADER_BYTES
from ._context import TaskContext
from ._generation import prepare, run_sampler
from ._images import to_png
from ._job import Checkpoint, Job, ValidationReport
from ._objective import Objective
from ._optim import Patience, check_iterations, check_name, check_stop, make_optimizer, optimize
from ._specs import ExampleSpec, GenerationSpec, LossSpec
from ._work import check_work, finetune_work
from .compute_gradient import check_grad_mode
from .optimize_latent import OptimizeResult

__all__ = ["run_finetune_weights", "METHODS", "OPTIM_PREFIX"]

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
    optimizer, method, lora_rank, lora_alpha = opts, opts.method, opts.lora_rank, opts.lora_alpha
    target_modules, checkpoint_every, name = opts.target_modules, opts.checkpoint_every, opts.name
    batch_size, grad_mode, memory_budget_mib = opts.batch_size or 0, opts.grad_mode, opts.memory_budget_mib
    resume_from, keep_checkpoints, validate_every = opts.resume_from, opts.keep_checkpoints, opts.validate_every
    keep_best, stop = opts.keep_best, opts.stop_when
    check_iterations(optimizer, ctx.limits)
    check_stop(stop, ctx.limits)
    if keep_best and not validation:
        raise InvalidArgument("keep_best needs validation examples")
    if not 1 <= validate_every <= ctx.limits.max_iterations:
        raise InvalidArgument(f"validate_every must lie in 1…{ctx.limits.max_iterations}")
    mode = check_grad_mode(grad_mode)
    check_name(name)
    if not 1 <= keep_checkpoints <= 100:
        raise InvalidArgument(f"keep_checkpoints must lie in 1…100; got {keep_checkpoints}")
    if method not in METHODS:
        raise InvalidArgument(f"method must be lora or full; got {method!r}")
    if spec.adapter:
        raise InvalidArgument("fine-tuning starts from the base model; adapter must be empty")
    if method == "lora" and lora_rank > ctx.limits.max_lora_rank:
        raise InvalidArgument(f"lora_rank must be at most {ctx.limits.max_lora_rank}")
    prep = prepare(ctx, _examples_generation(ctx, spec, examples))
    check_work(ctx.limits, finetune_work(prep.steps, prep.solver, mode, optimizer.iterations,
                                         validate_every, bool(validation)))
    targets = tuple(target_modules) or prep.backend.lora_targets
    try:
        model = (with_lora(prep.eps_fn, lora_rank or 4, lora_alpha or None, targets)
                 if method == "lora" else full_copy(prep.eps_fn))
    except ValueError as err:
        raise InvalidArgument(f"model {prep.model!r}: {err}") from err
    params = [p for p in model.parameters() if p.requires_grad]
    # Refused before any work when the run's artifacts cannot fit: up to keep + 1 checkpoints at
    # once (weights and two optimizer moments each), then the adapter. The bytes are reserved
    # until the run ends, so concurrent runs cannot all pass this check and fail at a checkpoint.
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    planned = (keep_checkpoints + 1) * (3 * weight_bytes + HEADER_BYTES) + weight_bytes + HEADER_BYTES
    with ctx.artifacts.reserve(planned):
        return _train(ctx, spec, losses, job, prep, model, params, optimizer, method=method,
                      lora_rank=lora_rank, lora_alpha=lora_alpha, targets=targets,
                      checkpoint_every=checkpoint_every, name=name, batch_size=batch_size,
                      mode=mode, memory_budget_mib=memory_budget_mib, resume_from=resume_from,
                      keep_checkpoints=keep_checkpoints, validation=validation,
                      validate_every=validate_every, keep_best=keep_best, stop=stop)


def _train(ctx, spec, losses, job, prep, model, params, optimizer, *, method, lora_rank,
           lora_alpha, targets, checkpoint_every, name, batch_size, mode, memory_budget_mib,
           resume_from, keep_checkpoints, validation, validate_every, keep_best, stop):
    """The run itself, once admitted (its artifacts' bytes reserved)."""
    meta = {"method": method, "rank": (lora_rank or 4) if method == "lora" else 0,
            "alpha": (lora_alpha or None) if method == "lora" else None,
            "targets": list(targets) if method == "lora" else [], "name": name}

    with torch.no_grad():
        x0_base = run_sampler(prep, job, grad_mode="none")
        reference = {"latent": x0_base, "image": prep.backend.decode(x0_base)}
    objective = Objective(ctx, prep.backend, losses, job, reference=reference)
    validator = _Validator(ctx, spec, validation, losses, job, prep) if validation else None
    opt = make_optimizer(optimizer, params)
    n = prep.batch
    size = min(batch_size or n, n)
    history, first = [], 0
    if resume_from:
        history, first = _resume(ctx, resume_from, prep.model, meta, model, opt, optimizer.iterations)

    kept: list[str] = []

    def checkpoint(done: int):
        info = ctx.artifacts.save("checkpoint", _checkpoint_tensors(model, opt), model=prep.model,
                                 name=name, iteration=done, metadata={**meta, "history": history})
        job.emit(Checkpoint(info))
        kept.append(info.id)
        while len(kept) > keep_checkpoints:
            ctx.artifacts.delete(kept.pop(0))

    def loss_at(it):
        idx = torch.arange(it * size, (it + 1) * size) % n
        objective.iteration = it
        objective.set_reference({k: v[idx] for k, v in reference.items()})
        cond = prep.cond[idx] if isinstance(prep.cond, torch.Tensor) else prep.cond
        uncond = prep.uncond[idx] if isinstance(prep.uncond, torch.Tensor) else prep.uncond
        x0 = run_sampler(prep, job, x_T=prep.x_T[idx], cond=cond, eps_fn=model, grad_mode=mode,
                         memory_budget_mib=memory_budget_mib,
                         iteration=it, uncond=uncond)
        return objective(x0), None, {}

    patience, best = Patience(stop), {"done": 0, "state": None}

    def after_step(done):
        periodic = checkpoint_every and done % checkpoint_every == 0
        if done < optimizer.iterations and (periodic or job.checkpoint_now.is_set()):
            job.checkpoint_now.clear()
            checkpoint(done)
        if validator is None:
            return patience.update(history[-1])  # the training loss (before this step)
        if done % validate_every and done < optimizer.iterations:
            return False
        validator(model, done, patience)
        if patience.improved:
            best["done"] = done
            if keep_best:
                best["state"] = {k: v.clone() for k, v in trainable_state(model).items()}
        return patience.stop_now

    try:
        optimize(job, opt, params, optimizer, loss_at, first=first, history=history,
                 after_step=after_step)
    except (Cancelled, DeadlineExceeded):
        if len(history) > first:
            checkpoint(len(history))  # durable: a stopped fine-tune resumes from here
        raise
    if best["state"] is not None:
        _restore(model, opt, best["state"])
    done = best["done"] if keep_best else len(history)
    info = ctx.artifacts.save(method, trainable_state(model), model=prep.model, name=name,
                             iteration=done, metadata={**meta, "history": history})
    model.requires_grad_(False)
    with torch.no_grad():
        objective.set_reference(reference)
        x0 = run_sampler(prep, job, eps_fn=model, grad_mode="none", iteration=len(history))
        images = prep.backend.decode(x0)
    return OptimizeResult(history[-1], history, prep.x_T, x0, to_png(images),
                          to_png(reference["image"]), info, best_iteration=[done],
                          iterations_run=len(history))


class _Validator:
    """The held-out examples: the base model's outputs (the content reference, the verdicts to
    keep), then ``validator(model, done, patience) → validation loss`` emitting a Validation event."""

    def __init__(self, ctx, spec, validation, losses, job, train_prep):
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


def _resume(ctx, checkpoint_id, model_name, meta, model, opt, iterations) -> tuple[list, int]:
    """Load a checkpoint of the same run: weights, optimizer state, loss history so far."""
    tensors, info = ctx.artifacts.load(checkpoint_id)
    if info.kind != "checkpoint":
        raise InvalidArgument(f"resume_from must be a checkpoint; {checkpoint_id} is a {info.kind}")
    if info.model != model_name:
        raise FailedPrecondition(f"checkpoint {checkpoint_id} belongs to model {info.model!r}")
    for key in ("method", "rank", "alpha", "targets"):
        if info.metadata.get(key) != meta.get(key):
            raise FailedPrecondition(f"checkpoint {checkpoint_id} was made with {key}="
                                     f"{info.metadata.get(key)!r}, this request has {meta.get(key)!r}")
    if info.iteration >= iterations:
        raise InvalidArgument(f"checkpoint {checkpoint_id} is at iteration {info.iteration}; "
                              f"ask for more than that many iterations")
    _restore(model, opt, tensors)
    history = [float(v) for v in info.metadata.get("history", [])][:info.iteration]
    return history, info.iteration
