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

from dataclasses import dataclass

import torch

from ..errors import InvalidArgument
from ..integrity import MAX_WEIGHT, check_number
from ._context import TaskContext
from ._generation import Prepared, decoder_budget, prepare, run_sampler
from ._images import to_png
from ._job import Job
from ._objective import Evaluation, Objective, generation_conditions
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


def check_options(ctx: TaskContext, spec: GenerationSpec, opts) -> tuple[str, float]:
    """(grad mode, prior weight), every option checked before the model is loaded."""
    check_iterations(opts, ctx.limits)
    check_stop(opts.stop_when, ctx.limits)
    if opts.prior not in PRIORS:
        raise InvalidArgument(f"prior must be norm or gaussian; got {opts.prior!r}")
    prior_weight = check_number("prior_weight", opts.prior_weight, MAX_WEIGHT)  # > 0: the options
    mode = check_grad_mode(opts.grad_mode)
    check_name(opts.name)
    if spec.embedding or spec.cond is not None:
        raise InvalidArgument("the embedding is what this call learns: leave embedding and cond unset")
    return mode, prior_weight


def with_target(losses: list[LossSpec], target_image: torch.Tensor | None) -> list[LossSpec]:
    """The request's losses, plus an image MSE to ``target_image`` when one is given."""
    losses = list(losses)
    if target_image is not None:
        losses.append(LossSpec("server", "mse", 1.0, "image", {}, {"target": target_image}))
    return losses


def prior_penalty(prep: Prepared, prior: str):
    """``v → penalty`` from the model's embedding table, or None without a prior."""
    if prior and not prep.backend.has_embedding_table:
        raise InvalidArgument(f"model {prep.model!r} has no embedding table for a prior")
    return embedding_prior(prior, prep.backend.embedding_table()) if prior else None


class _Embedding:
    """The vector being learned and the conditioning it gives: a new token through the text
    encoder (Stable Diffusion), else one conditioning vector shared by the batch."""

    def __init__(self, prep: Prepared, spec: GenerationSpec, token: TokenSpec | None):
        self.prep, self.textual, self.token = prep, prep.backend.has_text_encoder, token or TokenSpec()
        if self.textual:
            self.leaf = token_leaf(prep, self.token)
            self.meta = {"placeholder": self.token.placeholder or "<*>",
                         "prompt": prep.prompts[0] if prep.prompts else ""}
        else:
            backend = prep.backend
            start = backend.embed(backend.encode(1, **({"labels": spec.labels[:1]} if spec.labels else {})))
            self.leaf = master_tensor(start.cond).requires_grad_()  # float32 under a half network
            self.uncond = backend.embed(backend.encode(prep.batch)).uncond
            self.meta = {}
        self.best = self.leaf.detach().clone()

    def conditioning(self) -> tuple[object, object]:
        """(cond, uncond) from the current vector, rebuilt each time so the gradient reaches it."""
        if self.textual:
            c = encode_token(self.prep, self.token, self.leaf)
            return c.cond, c.uncond
        return self.leaf.expand(self.prep.batch, *self.leaf.shape[1:]), self.uncond

    def sample(self, job: Job, **kwargs) -> torch.Tensor:
        """x_0 under the current vector (``kwargs``: run_sampler's grad mode, iteration, budget)."""
        cond, uncond = self.conditioning()
        return run_sampler(self.prep, job, cond=cond, uncond=uncond, **kwargs)

    @torch.no_grad()
    def pictures(self, job: Job) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_0, decoded images) without gradient: the before and after pictures."""
        x0 = self.sample(job, grad_mode="none")
        return x0, self.prep.backend.decode(x0)

    def save_best(self, ctx: TaskContext, opts, iteration: int):
        """The best iterate (lowest loss) as an ``embedding`` artifact for ``generation.embedding``."""
        with torch.no_grad():
            self.leaf.copy_(self.best)
        return ctx.artifacts.save("embedding", {"token" if self.textual else "cond": self.leaf.detach()},
                                  model=self.prep.model, name=opts.name, iteration=iteration,
                                  metadata={**self.meta, "prior": opts.prior})


@dataclass
class _Loss:
    """``optimize``'s loss_at: the objective on this iteration's sample plus the prior's pull,
    remembering the best vector for the early stop and the artifact."""
    embedding: _Embedding
    objective: Objective
    job: Job
    opts: object
    mode: str
    penalty: object  # v → the prior's penalty, or None
    prior_weight: float
    patience: Patience

    def __call__(self, it: int):
        """(evaluation, images to report or None, extra report fields) of iteration ``it``."""
        self.objective.iteration = it
        x0 = self.embedding.sample(self.job, grad_mode=self.mode, iteration=it,
                                   memory_budget_mib=self.opts.memory_budget_mib)
        images = self.objective.decode(x0)  # no graph unless a term is on the image
        evaluation = self.with_prior(self.objective(x0, images))
        self.patience.update(float(evaluation.total.detach()))
        if self.patience.improved:
            self.embedding.best = self.embedding.leaf.detach().clone()
        every = self.opts.image_every
        return evaluation, images if every and it % every == 0 else None, {}

    def with_prior(self, evaluation: Evaluation) -> Evaluation:
        """The prior term, counted once per sample using the vector so that its balance with the
        summed per-sample losses does not depend on the batch."""
        if self.penalty is None:
            return evaluation
        term = self.prior_weight * self.penalty(self.embedding.leaf)
        return Evaluation(evaluation.total + self.embedding.prep.batch * term, evaluation.values,
                          evaluation.per_sample + float(term.detach()))


def run_optimize_embedding(ctx: TaskContext, spec: GenerationSpec, losses: list[LossSpec], job: Job,
                           opts, token: TokenSpec | None = None,
                           target_image: torch.Tensor | None = None) -> OptimizeResult:
    """OptimizeEmbedding with the request's options ``opts``; ``token`` (SD: the token to learn,
    with a decoded starting embedding) and ``target_image`` are its tensors."""
    mode, prior_weight = check_options(ctx, spec, opts)
    prep = prepare(ctx, spec)
    check_work(ctx.limits, embedding_work(prep.steps, prep.solver, mode, opts.iterations))
    # The samples are generated from the conditioning being learned, not from a prompt or label:
    # a term that defaults to a sample's own prompt or label needs it given (its prompts hold
    # the placeholder; a digits start label is where the vector starts, not what it becomes).
    objective = Objective(ctx, prep.backend, with_target(losses, target_image), job,
                          conditions=generation_conditions(spec, prep, learned=True))
    objective.plan_decoder(len(prep.x_T), decoder_budget(prep, job, opts.memory_budget_mib),
                           opts.decoder_tile)
    embedding = _Embedding(prep, spec, token)
    loss = _Loss(embedding, objective, job, opts, mode, prior_penalty(prep, opts.prior), prior_weight,
                 Patience(opts.stop_when))
    opt = make_optimizer(opts, [embedding.leaf])
    initial = to_png(embedding.pictures(job)[1])
    history = optimize(job, opt, [embedding.leaf], opts, loss,
                       after_step=lambda done: loss.patience.stop_now)
    patience = loss.patience
    info = embedding.save_best(ctx, opts, patience.best_at)
    x0, images = embedding.pictures(job)
    return OptimizeResult(patience.best, history, prep.x_T, x0, to_png(images), initial, info,
                          best_iteration=[patience.best_at], iterations_run=len(history))
