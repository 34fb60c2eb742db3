"""OptimizeEmbedding: learn a conditioning from a loss or a target image (paper Appendix A).

Stable Diffusion: a new token's input embedding, through the text encoder (textual inversion;
the prompt holds a placeholder). Other models: one conditioning vector shared by the batch (the
digits model: a class-embedding vector). The result is an ``embedding`` artifact that ``Sample``
takes as ``generation.embedding``.
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgument
from ._context import TaskContext
from ._generation import prepare, run_sampler
from ._images import to_png
from ._job import Job
from ._objective import Objective
from ._optim import check_iterations, check_name, make_optimizer, optimize
from ._specs import GenerationSpec, LossSpec, OptimizerSpec, TokenSpec
from .gradient import check_grad_mode, encode_token, token_leaf
from .optimize_latent import OptimizeResult

__all__ = ["run_optimize_embedding"]


def run_optimize_embedding(ctx: TaskContext, spec: GenerationSpec, losses: list[LossSpec], job: Job, *,
                           optimizer: OptimizerSpec, token: TokenSpec | None = None,
                           target_image: torch.Tensor | None = None, name: str = "",
                           grad_mode: str = "", image_every: int = 0) -> OptimizeResult:
    check_iterations(optimizer, ctx.limits)
    mode = check_grad_mode(grad_mode)
    check_name(name)
    if spec.embedding or spec.cond is not None:
        raise InvalidArgument("the embedding is what this call learns: leave embedding and cond unset")
    prep = prepare(ctx, spec)
    losses = list(losses)
    if target_image is not None:
        losses.append(LossSpec("server", "mse", 1.0, "image", {}, {"target": target_image}))
    objective = Objective(ctx, prep.backend, losses, job)
    textual = prep.backend.has_text_encoder
    token = token or TokenSpec()
    if textual:
        leaf = token_leaf(prep, token)
        meta = {"placeholder": token.placeholder or "<*>", "prompt": prep.prompts[0] if prep.prompts else ""}
    else:
        start = prep.backend.embed(prep.backend.encode(1, **({"labels": spec.labels[:1]} if spec.labels else {})))
        leaf = start.cond.detach().to(prep.backend.dtype).clone().requires_grad_()
        uncond = prep.backend.embed(prep.backend.encode(prep.batch)).uncond
        meta = {}
    opt = make_optimizer(optimizer, [leaf])

    def conditioning():
        if textual:
            c = encode_token(prep, token, leaf)
            return c.cond, c.uncond
        return leaf.expand(prep.batch, *leaf.shape[1:]), uncond

    with torch.no_grad():
        initial = to_png(prep.backend.decode(run_sampler(prep, job, cond=conditioning()[0],
                                                         uncond=conditioning()[1], grad_mode="none")))

    def loss_at(it):
        objective.iteration = it
        cond, uncond_now = conditioning()
        x0 = run_sampler(prep, job, cond=cond, uncond=uncond_now, grad_mode=mode, iteration=it)
        images = prep.backend.decode(x0)
        total, values = objective(x0, images)
        return total, values, images if image_every and it % image_every == 0 else None

    history = optimize(job, opt, [leaf], optimizer.iterations, loss_at)
    key = "token" if textual else "cond"
    info = ctx.artifacts.save("embedding", {key: leaf.detach()}, model=prep.model, name=name,
                             iteration=optimizer.iterations, metadata=meta)
    with torch.no_grad():
        cond, uncond_now = conditioning()
        x0 = run_sampler(prep, job, cond=cond, uncond=uncond_now, grad_mode="none")
        images = prep.backend.decode(x0)
    return OptimizeResult(history[-1], history, prep.x_T, x0, to_png(images), initial, info)
