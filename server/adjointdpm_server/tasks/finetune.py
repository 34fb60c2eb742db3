"""FinetuneWeights: LoRA or full fine-tuning of the model on a loss over (noise, prompt) examples.

The paper's stylization (§4.2, eq. 13: a Gram style term plus a content term that keeps each
example close to what the base model made of it — ``reference`` below). Works on a copy: the
resident model is never modified; checkpoints and the result are safetensors artifacts, and the
result is an adapter ``Sample`` accepts by its id.
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgument
from ..models._adapters import full_copy, trainable_state, with_lora
from ._generation import prepare, run_sampler
from ._images import to_png
from ._job import Checkpoint, Job
from ._objective import Objective
from ._optim import check_iterations, make_optimizer, report
from ._specs import ExampleSpec, GenerationSpec, LossSpec, OptimizerSpec
from .gradient import check_grad_mode
from .optimize_latent import OptimizeResult

__all__ = ["run_finetune", "METHODS"]

METHODS = ("lora", "full")


def _examples_generation(rt, spec: GenerationSpec, examples: list[ExampleSpec]) -> GenerationSpec:
    """All examples as one batch: x_T stacked (seeded ones drawn here) and their conditioning."""
    if not 1 <= len(examples) <= rt.limits.max_examples:
        raise InvalidArgument(f"give 1…{rt.limits.max_examples} examples; got {len(examples)}")
    _, backend = rt.model(spec.model)
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


def run_finetune(rt, spec: GenerationSpec, examples: list[ExampleSpec], losses: list[LossSpec],
                 job: Job, *, optimizer: OptimizerSpec, method: str = "lora", lora_rank: int = 4,
                 lora_alpha: float | None = None, target_modules=(), checkpoint_every: int = 0,
                 name: str = "", batch_size: int = 0, grad_mode: str = "") -> OptimizeResult:
    check_iterations(optimizer, rt.limits)
    mode = check_grad_mode(grad_mode)
    if method not in METHODS:
        raise InvalidArgument(f"method must be lora or full; got {method!r}")
    if spec.adapter:
        raise InvalidArgument("fine-tuning starts from the base model; adapter must be empty")
    prep = prepare(rt, _examples_generation(rt, spec, examples))
    targets = tuple(target_modules) or prep.backend.lora_targets
    try:
        model = (with_lora(prep.eps_fn, lora_rank or 4, lora_alpha or None, targets)
                 if method == "lora" else full_copy(prep.eps_fn))
    except ValueError as err:
        raise InvalidArgument(f"model {prep.model!r}: {err}") from err
    params = [p for p in model.parameters() if p.requires_grad]
    meta = {"method": method, "rank": (lora_rank or 4) if method == "lora" else 0,
            "alpha": (lora_alpha or None) if method == "lora" else None,
            "targets": list(targets) if method == "lora" else [], "name": name}

    with torch.no_grad():
        x0_base = run_sampler(prep, job, grad_mode="none")
        reference = {"latent": x0_base, "image": prep.backend.decode(x0_base)}
    objective = Objective(rt, prep.backend, losses, job, reference=reference)
    opt = make_optimizer(optimizer, params)
    n = prep.batch
    size = min(batch_size or n, n)
    history = []
    for it in range(optimizer.iterations):
        job.check()
        idx = torch.arange(it * size, (it + 1) * size) % n
        objective.iteration = it
        objective.set_reference({k: v[idx] for k, v in reference.items()})
        cond = prep.cond[idx] if isinstance(prep.cond, torch.Tensor) else prep.cond
        uncond = prep.uncond[idx] if isinstance(prep.uncond, torch.Tensor) else prep.uncond
        x0 = run_sampler(prep, job, x_T=prep.x_T[idx], cond=cond, eps_fn=model, grad_mode=mode,
                         iteration=it, uncond=uncond)
        total, values = objective(x0)
        opt.zero_grad()
        total.backward()
        grad_norm = float(torch.sqrt(sum((p.grad.square().sum() for p in params if p.grad is not None),
                                         torch.tensor(0.0))))
        history.append(report(job, it, total, values, grad_norm))
        opt.step()
        if checkpoint_every and (it + 1) % checkpoint_every == 0 and it + 1 < optimizer.iterations:
            info = rt.artifacts.save("checkpoint", trainable_state(model), model=prep.model,
                                     name=name, iteration=it + 1, metadata=meta)
            job.emit(Checkpoint(info))
    info = rt.artifacts.save(method, trainable_state(model), model=prep.model, name=name,
                             iteration=optimizer.iterations, metadata=meta)
    model.requires_grad_(False)
    with torch.no_grad():
        objective.set_reference(reference)
        x0 = run_sampler(prep, job, eps_fn=model, grad_mode="none", iteration=optimizer.iterations)
        images = prep.backend.decode(x0)
    return OptimizeResult(history[-1], history, prep.x_T, x0, to_png(images),
                          to_png(reference["image"]), info)
