"""ComputeGradient: ∂L/∂(x_T or x_t, conditioning, a new token, weights) of a loss on x_0.

The sample runs in the requested grad mode (``checkpoint``: the exact gradient of the discrete
sampler at flat memory; ``adjoint``: paper eq. 11, re-solved trajectory), the loss terms run on
the decoded image or on x_0, and one ``torch.autograd.grad`` gives every requested gradient.
"""

from __future__ import annotations

import random

from dataclasses import dataclass, field

import torch

from ..core import GRAD_MODES
from ..errors import InvalidArgument
from ..integrity import check_result
from ..models import Conditioning
from ..models._adapters import with_trainable_view
from ..telemetry import tracing
from ._context import TaskContext
from ._generation import Prepared, decoder_budget, prepare, run_sampler
from ._images import to_png
from ._job import Job
from ._objective import Evaluation, Objective, generation_conditions
from ._optim import master_tensor
from ._reply import check_reply_size, reply_bytes, wire_itemsize
from ._specs import GenerationSpec, LossSpec, TokenSpec
from ._work import check_work, gradient_work

__all__ = ["TARGETS", "GradientResult", "run_compute_gradient", "check_grad_mode", "token_leaf"]

TARGETS = ("x_T", "cond", "token", "weights")


@dataclass
class GradientResult:
    loss: float
    loss_terms: list[float]
    x0: torch.Tensor
    images: list[bytes]
    gradients: dict[str, torch.Tensor]
    weight_gradients: dict[str, torch.Tensor] = field(default_factory=dict)
    weights_artifact: object = None
    nfe: int = 0
    sample_losses: list[float] = field(default_factory=list)


def check_grad_mode(mode: str) -> str:
    """A request's ``grad_mode``; "" is ``auto`` (exact, as fast as the memory budget allows)."""
    mode = mode or "auto"
    if mode not in GRAD_MODES or mode == "none":
        raise InvalidArgument(f"grad_mode must be one of auto, checkpoint, adjoint, backprop; got {mode!r}")
    return mode


def truncation(opts, iteration: int = 0, targets=()) -> int | None:
    """The K of a truncated gradient at ``iteration`` (None: exact). DRaFT-K: ``truncate``;
    AlignProp's randomized truncation: K uniform in ``truncate_min…truncate``, drawn from a
    generator seeded with the iteration (the same stream on every run and every resume).
    Approximate by construction; x_T gets no gradient, so it cannot be a target."""
    if not opts.truncate:
        if opts.truncate_min:
            raise InvalidArgument("truncate_min needs truncate (the largest K)")
        return None
    if opts.truncate_min > opts.truncate:
        raise InvalidArgument(f"truncate_min ({opts.truncate_min}) must be at most truncate ({opts.truncate})")
    if "x_T" in targets:
        raise InvalidArgument("a truncated gradient (truncate) has none w.r.t. x_T: the state entering "
                              "the last K steps is a constant; ask for cond, token or weights")
    if opts.truncate_min:
        return random.Random(iteration).randint(opts.truncate_min, opts.truncate)
    return opts.truncate


def token_leaf(prep: Prepared, token: TokenSpec) -> torch.Tensor:
    """The starting embedding of a new token (textual inversion), a leaf requiring grad."""
    backend = prep.backend
    if not backend.has_text_encoder:
        raise InvalidArgument(f"model {prep.model!r} has no text encoder: a token target needs a "
                              "prompt-conditioned (Stable Diffusion) model")
    if token.embedding is not None:
        if tuple(token.embedding.shape) != (backend.token_dim,):
            raise InvalidArgument(f"the token embedding must have shape ({backend.token_dim},)")
        start = token.embedding.to(backend.device, backend.dtype)
    elif token.initializer:
        try:
            start = backend.token_init(token.initializer)
        except ValueError as err:
            raise InvalidArgument(str(err)) from err
    else:
        start = backend.random_token(seed=0)
    return master_tensor(start).requires_grad_()  # float32 under a half network (optimizers step it)


def encode_token(prep: Prepared, token: TokenSpec, leaf: torch.Tensor) -> Conditioning:
    """The guided conditioning of the prompt with ``leaf`` at the placeholder, so the token's
    gradient flows through the text encoder."""
    placeholder = token.placeholder or "<*>"
    if not prep.prompts:
        raise InvalidArgument(f"a token target needs a prompt containing {placeholder!r}")
    text = prep.prompts[0] if len(prep.prompts) == 1 else prep.prompts
    try:
        c = prep.backend.encode_with_token(prep.batch, text, leaf.to(prep.backend.dtype),
                                           placeholder=placeholder)
        return prep.backend.guide(c, prep.requested_guidance)
    except ValueError as err:
        raise InvalidArgument(str(err)) from err


def checked_targets(targets) -> tuple[str, ...]:
    """The requested targets once each, in order (x_T when none), so a typo fails before any work."""
    targets = tuple(dict.fromkeys(targets or ("x_T",)))
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise InvalidArgument(f"unknown gradient targets {unknown}; choose from {', '.join(TARGETS)}")
    return targets


@dataclass
class _Plan:
    """What the sampler runs on and what one backward differentiates (leaves, then weights)."""
    x_T: torch.Tensor
    cond: object
    leaves: dict[str, torch.Tensor]
    model: str
    eps_fn: object
    weight_leaves: dict[str, torch.Tensor] = field(default_factory=dict)
    inline: bool = False

    @property
    def names(self) -> list[str]:
        """The gradients' names, in the order of ``inputs``."""
        return list(self.leaves) + list(self.weight_leaves)

    @property
    def inputs(self) -> list[torch.Tensor]:
        """Every tensor ``torch.autograd.grad`` differentiates, in the order of ``names``."""
        return list(self.leaves.values()) + list(self.weight_leaves.values())

    def split(self, grads: list[torch.Tensor]) -> tuple[dict, dict]:
        """``grads`` (in ``inputs`` order) as target gradients and weight gradients, by name."""
        return (dict(zip(self.leaves, grads[:len(self.leaves)])),
                dict(zip(self.weight_leaves, grads[len(self.leaves):])))

    @property
    def weight_count(self) -> int:
        """How many weight-gradient numbers the reply or artifact carries."""
        return sum(p.numel() for p in self.weight_leaves.values())


def cond_leaf(prep: Prepared, targets) -> tuple[torch.Tensor, object]:
    """The embedded conditioning as a leaf (cond, uncond): its gradient is ∂L/∂cond."""
    if "token" in targets:
        raise InvalidArgument("choose cond or token, not both (the token acts through cond)")
    c = prep.backend.embed(Conditioning(prep.cond, prep.uncond))
    return c.cond.detach().clone().requires_grad_(), c.uncond


def target_leaves(prep: Prepared, targets, token: TokenSpec | None) -> _Plan:
    """The gradient's leaves for each target among x_T, cond and token, and the cond they give."""
    x_T = prep.x_T.clone().requires_grad_("x_T" in targets)
    leaves = {"x_T": x_T} if "x_T" in targets else {}
    cond, uncond = prep.cond, prep.uncond
    if "cond" in targets:
        cond, uncond = cond_leaf(prep, targets)
        leaves["cond"] = cond
    if "token" in targets:
        token = token or TokenSpec()
        leaves["token"] = token_leaf(prep, token)
        c = encode_token(prep, token, leaves["token"])
        cond, uncond = c.cond, c.uncond
    prep.uncond = uncond  # the sampler reads uncond from prep
    return _Plan(x_T, cond, leaves, prep.model, prep.eps_fn)


def weight_leaves(ctx: TaskContext, spec: GenerationSpec, prep: Prepared, weights):
    """(network, its weight leaves): a fresh LoRA on the base model, or a trainable view of the
    named parameters, so the gradient reaches weights without touching the shared network."""
    try:
        if not weights.lora_rank:
            return with_trainable_view(prep.eps_fn, weights.parameters)
        if weights.lora_rank > ctx.limits.max_lora_rank:
            raise InvalidArgument(f"lora_rank must be at most {ctx.limits.max_lora_rank}")
        if spec.adapter:
            raise InvalidArgument("a fresh LoRA goes on the base model: leave adapter unset")
        eps_fn = ctx.new_lora(prep.model, weights.lora_rank, None, prep.backend.lora_targets)
        return eps_fn, {n: p for n, p in eps_fn.named_parameters() if p.requires_grad}
    except ValueError as err:
        raise InvalidArgument(str(err)) from err


def weights_inline(limits, weights, plan: _Plan, estimate: int, element_size: int) -> bool:
    """Whether weight gradients go inline: asked for and within the message; else an artifact."""
    count = plan.weight_count
    return (bool(plan.weight_leaves) and weights.inline
            and count <= limits.max_inline_weight_elements
            and estimate + count * element_size <= limits.max_message_bytes)


def gradient_plan(ctx: TaskContext, spec: GenerationSpec, prep: Prepared, targets, opts,
                  token: TokenSpec | None) -> _Plan:
    """The leaves, the weight leaves and where weight gradients go, with the reply size checked
    before the sample runs (a result too big for a message is refused before the work)."""
    plan = target_leaves(prep, targets, token)
    if "weights" in targets:
        plan.eps_fn, plan.weight_leaves = weight_leaves(ctx, spec, prep, opts.weights)
    estimate = reply_bytes(prep, images=opts.images,
                           extra_elements=sum(leaf.numel() for leaf in plan.leaves.values()))
    check_reply_size(ctx.limits, estimate, "gradient result")
    plan.inline = weights_inline(ctx.limits, opts.weights, plan, estimate, wire_itemsize(prep))
    return plan


def differentiate(total, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """One backward for every input; zeros where the loss does not reach one (not None)."""
    if not isinstance(total, torch.Tensor) or not total.requires_grad:
        raise InvalidArgument("the loss does not depend on the requested targets")
    with tracing.span("adjointdpm.backward"):
        grads = torch.autograd.grad(total, inputs, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, grads)]


def check_outputs(spec: GenerationSpec, losses: list[LossSpec], evaluation: Evaluation, x0,
                  gradients: dict[str, torch.Tensor]) -> None:
    """The checked outputs: loss, x_0 and each gradient finite before they leave (INVALID_ARGUMENT
    when the request's own numbers drove them there, INTERNAL otherwise)."""
    from_inputs = spec.has_client_numbers or any(
        loss.kind == "client" or loss.tensors for loss in losses)
    outputs = {"loss": evaluation.total, "x_0": x0,
               **{f"gradient w.r.t. {n}": g for n, g in gradients.items()}}
    for name, value in outputs.items():
        check_result(name, value, from_inputs=from_inputs)


def attach_weight_gradients(ctx: TaskContext, result: GradientResult, plan: _Plan, weights,
                            grads: dict[str, torch.Tensor]) -> None:
    """Weight gradients inline when they fit, else as a ``weight_gradients`` artifact."""
    if plan.inline:
        result.weight_gradients = {k: v.detach() for k, v in grads.items()}
        return
    result.weights_artifact = ctx.artifacts.save(
        "weight_gradients", grads, model=plan.model,
        metadata={"lora_rank": weights.lora_rank, "parameters": list(weights.parameters),
                  "loss": result.loss, "elements": plan.weight_count})


def run_compute_gradient(ctx: TaskContext, spec: GenerationSpec, losses: list[LossSpec], job: Job,
                         opts, token: TokenSpec | None = None) -> GradientResult:
    """ComputeGradient with the request's options ``opts``; ``token`` carries a decoded starting
    embedding when the request gives one."""
    targets = checked_targets(opts.targets)
    mode = check_grad_mode(opts.grad_mode)
    prep = prepare(ctx, spec)
    check_work(ctx.limits, gradient_work(prep.steps, prep.solver, mode))
    # each sample's prompt or label for the terms that default to it; a token target's prompts
    # hold its placeholder, no text to score against
    objective = Objective(ctx, prep.backend, losses, job,
                          conditions=generation_conditions(spec, prep, learned="token" in targets))
    plan = gradient_plan(ctx, spec, prep, targets, opts, token)
    objective.plan_decoder(len(plan.x_T), decoder_budget(prep, job, opts.memory_budget_mib),
                           opts.decoder_tile)
    x0 = run_sampler(prep, job, x_T=plan.x_T, cond=plan.cond, eps_fn=plan.eps_fn, grad_mode=mode,
                     memory_budget_mib=opts.memory_budget_mib, truncate=truncation(opts, 0, targets))
    decoded = objective.decode(x0) if objective.needs_image or opts.images else None
    evaluation = objective(x0, decoded)
    grads = differentiate(evaluation.total, plan.inputs)
    job.check()
    check_outputs(spec, losses, evaluation, x0, dict(zip(plan.names, grads)))
    named, weight_grads = plan.split(grads)
    result = GradientResult(float(evaluation.total.detach()), evaluation.values, x0.detach(),
                            to_png(decoded) if opts.images else [],
                            {k: v.detach() for k, v in named.items()},
                            nfe=job.nfe, sample_losses=evaluation.per_sample.tolist())
    if weight_grads:
        attach_weight_gradients(ctx, result, plan, opts.weights, weight_grads)
    return result
