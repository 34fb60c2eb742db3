"""OptimizeEmbedding: learn a conditioning from a loss or a target image (paper Appendix A).

Stable Diffusion: a new token's input embedding, through the text encoder (textual inversion;
the prompt holds a placeholder). Other models: one conditioning vector shared by the batch (the
digits model: a class-embedding vector). The result is an ``embedding`` artifact that ``Sample``
takes as ``generation.embedding``: the best iterate's vector (lowest loss), the run stopping early
on ``stop_when``. A ``prior`` keeps the vector where the model's own embeddings live
(docs/design.md §7): a loss alone pushes it off the table (norm ~18.5 where labels have ~14 on
digits) into conditionings the model never saw, which sample hazy digits.
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgument
from ..integrity import MAX_WEIGHT, check_number
from ._context import TaskContext
from ._generation import prepare, run_sampler
from ._images import to_png
from ._job import Job
from ._objective import Evaluation, Objective
from ._optim import (Patience, check_iterations, check_name, check_stop, make_optimizer,
                     master_tensor, optimize)
from ._specs import GenerationSpec, LossSpec, TokenSpec
from ._work import check_work, embedding_work
from .compute_gradient import check_grad_mode, encode_token, token_leaf
from .optimize_latent import OptimizeResult

__all__ = ["run_optimize_embedding", "embedding_prior", "PRIORS"]

PRIORS = ("", "norm", "gaussian")


def embedding_prior(kind: str, table: torch.Tensor):
    """``v → penalty`` from the statistics of the model's own embeddings (rows of ``table``):
    ``norm``: (|v| / mean row norm − 1)²; ``gaussian``: ½ · mean over dimensions of
    ((v − μ_d) / σ_d)², the per-dimension Gaussian fitted to the rows."""
    table = table.detach().to(torch.float32)
    if kind == "norm":
        radius = table.norm(dim=1).mean()
        return lambda v: (v.float().norm() / radius - 1.0).square()
    mean, std = table.mean(0), table.std(0).clamp_min(1e-6)
    return lambda v: 0.5 * ((v.float().reshape(-1, table.shape[1]) - mean) / std).square().mean()


def run_optimize_embedding(ctx: TaskContext, spec: GenerationSpec, losses: list[LossSpec], job: Job,
                           opts, token: TokenSpec | None = None,
                           target_image: torch.Tensor | None = None) -> OptimizeResult:
    """OptimizeEmbedding with the request's options ``opts``; ``token`` (SD: the token to learn,
    with a decoded starting embedding) and ``target_image`` are its tensors. ``prior_weight``
    counts once per sample using the vector, so its balance with the summed per-sample losses
    does not depend on the batch."""
    optimizer, name, grad_mode, memory_budget_mib = opts, opts.name, opts.grad_mode, opts.memory_budget_mib
    image_every, prior, prior_weight, stop = opts.image_every, opts.prior, opts.prior_weight, opts.stop_when
    check_iterations(optimizer, ctx.limits)
    check_stop(stop, ctx.limits)
    if prior not in PRIORS:
        raise InvalidArgument(f"prior must be norm or gaussian; got {prior!r}")
    prior_weight = check_number("prior_weight", prior_weight, MAX_WEIGHT) or (1.0 if prior else 0.0)
    if prior_weight < 0:
        raise InvalidArgument(f"prior_weight must be ≥ 0; got {prior_weight}")
    mode = check_grad_mode(grad_mode)
    check_name(name)
    if spec.embedding or spec.cond is not None:
        raise InvalidArgument("the embedding is what this call learns: leave embedding and cond unset")
    prep = prepare(ctx, spec)
    check_work(ctx.limits, embedding_work(prep.steps, prep.solver, mode, optimizer.iterations))
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
        leaf = master_tensor(start.cond).requires_grad_()  # float32 under a half network
        uncond = prep.backend.embed(prep.backend.encode(prep.batch)).uncond
        meta = {}
    if prior and not prep.backend.has_embedding_table:
        raise InvalidArgument(f"model {prep.model!r} has no embedding table for a prior")
    penalty = embedding_prior(prior, prep.backend.embedding_table()) if prior else None
    opt = make_optimizer(optimizer, [leaf])

    def conditioning():
        if textual:
            c = encode_token(prep, token, leaf)
            return c.cond, c.uncond
        return leaf.expand(prep.batch, *leaf.shape[1:]), uncond

    with torch.no_grad():
        initial = to_png(prep.backend.decode(run_sampler(prep, job, cond=conditioning()[0],
                                                         uncond=conditioning()[1], grad_mode="none")))

    best_leaf, patience = leaf.detach().clone(), Patience(stop)

    def loss_at(it):
        nonlocal best_leaf
        objective.iteration = it
        cond, uncond_now = conditioning()
        x0 = run_sampler(prep, job, cond=cond, uncond=uncond_now, grad_mode=mode, iteration=it,
                         memory_budget_mib=memory_budget_mib)
        images = prep.backend.decode(x0)
        total, values, per_sample = objective(x0, images)
        if penalty is not None:
            term = prior_weight * penalty(leaf)
            total, per_sample = total + prep.batch * term, per_sample + float(term.detach())
        patience.update(float(total.detach()))
        if patience.improved:
            best_leaf = leaf.detach().clone()
        shown = images if image_every and it % image_every == 0 else None
        return Evaluation(total, values, per_sample), shown, {}

    history = optimize(job, opt, [leaf], optimizer, loss_at, after_step=lambda done: patience.stop_now)
    key = "token" if textual else "cond"
    with torch.no_grad():
        leaf.copy_(best_leaf)
    info = ctx.artifacts.save("embedding", {key: leaf.detach()}, model=prep.model, name=name,
                             iteration=patience.best_at, metadata={**meta, "prior": prior})
    with torch.no_grad():
        cond, uncond_now = conditioning()
        x0 = run_sampler(prep, job, cond=cond, uncond=uncond_now, grad_mode="none")
        images = prep.backend.decode(x0)
    return OptimizeResult(patience.best, history, prep.x_T, x0, to_png(images), initial, info,
                          best_iteration=[patience.best_at], iterations_run=len(history))
