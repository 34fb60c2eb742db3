"""ComputeGradient: ∂L/∂(x_T or x_t, conditioning, a new token, weights) of a loss on x_0.

The sample runs in the requested grad mode (``checkpoint``: the exact gradient of the discrete
sampler at flat memory; ``adjoint``: paper eq. 11, re-solved trajectory), the loss terms run on
the decoded image or on x_0, and one ``torch.autograd.grad`` gives every requested gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core import GRAD_MODES
from ..errors import InvalidArgument
from ..integrity import check_result
from ..models import Conditioning
from ..models._adapters import with_lora, with_trainable_view
from ..telemetry import tracing
from ._context import TaskContext
from ._generation import Prepared, prepare, run_sampler
from ._images import to_png
from ._job import Job
from ._objective import Objective
from ._optim import master_tensor
from ._reply import check_reply_size, reply_bytes
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


def run_compute_gradient(ctx: TaskContext, spec: GenerationSpec, losses: list[LossSpec], job: Job,
                         opts, token: TokenSpec | None = None) -> GradientResult:
    """ComputeGradient with the request's options ``opts``; ``token`` carries a decoded starting
    embedding when the request gives one."""
    targets, grad_mode, memory_budget_mib = opts.targets, opts.grad_mode, opts.memory_budget_mib
    weights, images = opts.weights, opts.images
    targets = tuple(dict.fromkeys(targets or ("x_T",)))
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise InvalidArgument(f"unknown gradient targets {unknown}; choose from {', '.join(TARGETS)}")
    mode = check_grad_mode(grad_mode)
    prep = prepare(ctx, spec)
    check_work(ctx.limits, gradient_work(prep.steps, prep.solver, mode))
    objective = Objective(ctx, prep.backend, losses, job)
    leaves: dict[str, torch.Tensor] = {}

    x_T = prep.x_T.clone().requires_grad_("x_T" in targets)
    if "x_T" in targets:
        leaves["x_T"] = x_T
    cond, uncond = prep.cond, prep.uncond
    if "cond" in targets:
        if "token" in targets:
            raise InvalidArgument("choose cond or token, not both (the token acts through cond)")
        c = prep.backend.embed(Conditioning(cond, uncond))
        cond, uncond = c.cond.detach().clone().requires_grad_(), c.uncond
        leaves["cond"] = cond
    if "token" in targets:
        leaf = token_leaf(prep, token or TokenSpec())
        c = encode_token(prep, token or TokenSpec(), leaf)
        cond, uncond = c.cond, c.uncond
        leaves["token"] = leaf
    prep.uncond = uncond
    eps_fn, weight_leaves = prep.eps_fn, {}
    if "weights" in targets:
        try:
            if weights.lora_rank:
                if weights.lora_rank > ctx.limits.max_lora_rank:
                    raise InvalidArgument(f"lora_rank must be at most {ctx.limits.max_lora_rank}")
                if spec.adapter:
                    raise InvalidArgument("a fresh LoRA goes on the base model: leave adapter unset")
                eps_fn = with_lora(prep.eps_fn, weights.lora_rank, targets=prep.backend.lora_targets)
                weight_leaves = {n: p for n, p in eps_fn.named_parameters() if p.requires_grad}
            else:
                eps_fn, weight_leaves = with_trainable_view(prep.eps_fn, weights.parameters)
        except ValueError as err:
            raise InvalidArgument(str(err)) from err

    estimate = reply_bytes(prep, images=images,
                           extra_elements=sum(leaf.numel() for leaf in leaves.values()))
    check_reply_size(ctx.limits, estimate, "gradient result")
    weight_count = sum(p.numel() for p in weight_leaves.values())
    # inline when asked and when it fits in the message; otherwise the gradients go to an artifact
    inline = (bool(weight_leaves) and weights.inline
              and weight_count <= ctx.limits.max_inline_weight_elements
              and estimate + weight_count * prep.x_T.element_size() <= ctx.limits.max_message_bytes)
    x0 = run_sampler(prep, job, x_T=x_T, cond=cond, eps_fn=eps_fn, grad_mode=mode,
                     memory_budget_mib=memory_budget_mib)
    decoded = prep.backend.decode(x0) if objective.needs_image or images else None
    total, values, per_sample = objective(x0, decoded)
    inputs = list(leaves.values()) + list(weight_leaves.values())
    if not isinstance(total, torch.Tensor) or not total.requires_grad:
        raise InvalidArgument("the loss does not depend on the requested targets")
    with tracing.span("adjointdpm.backward"):
        grads = torch.autograd.grad(total, inputs, allow_unused=True)
    grads = [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, grads)]
    job.check()
    from_inputs = spec.has_client_numbers or any(
        loss.kind == "client" or loss.tensors for loss in losses)
    outputs = {"loss": total, "x_0": x0,
               **{f"gradient w.r.t. {n}": g for n, g in zip(list(leaves) + list(weight_leaves), grads)}}
    for name, value in outputs.items():
        check_result(name, value, from_inputs=from_inputs)
    named = dict(zip(leaves, grads[:len(leaves)]))
    weight_grads = dict(zip(weight_leaves, grads[len(leaves):]))
    result = GradientResult(float(total.detach()), values, x0.detach(),
                            to_png(decoded) if images else [], {k: v.detach() for k, v in named.items()},
                            nfe=job.nfe, sample_losses=per_sample.tolist())
    if weight_grads:
        if inline:
            result.weight_gradients = {k: v.detach() for k, v in weight_grads.items()}
        else:
            result.weights_artifact = ctx.artifacts.save(
                "weight_gradients", weight_grads, model=prep.model,
                metadata={"lora_rank": weights.lora_rank, "parameters": list(weights.parameters),
                          "loss": result.loss, "elements": weight_count})
    return result
