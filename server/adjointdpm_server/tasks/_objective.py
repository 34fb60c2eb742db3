"""The request's loss: a weighted sum of client-side and server-side terms on the image or x_0.

Client terms become ``RemoteLoss`` calls that send ``x`` over the job's stream and wait for the
answer; server terms are plugins from the registry. Server terms may read, besides their
parameters, the base model's output (``reference``) and what each scored sample was generated
from (``conditions``: its prompt or class label, ``generation_conditions``): the kind of the
conditions is fixed when the terms are built (a term that needs a sample's own prompt refuses a
request without prompts before any work), their values are set for each scored batch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..errors import InvalidArgument
from ..integrity import check_result
from ..losses import Conditions, LossContext, RemoteLoss, build_loss
from ..models._tiling import check_tile
from ._job import ClientQuery, Job
from ._specs import GenerationSpec, LossSpec

__all__ = ["Objective", "Evaluation", "generation_conditions", "sample_conditions"]


def sample_conditions(backend, *, prompts=(), labels=()) -> Conditions:
    """Conditions from one prompt or one label per sample (at most one of the two given, as the
    model accepted them): on a label-conditioned model (digits) a digit prompt "7" is the label 7,
    as the model reads it; nothing given is none."""
    if labels:
        return Conditions("labels", tuple(int(v) for v in labels))
    if prompts and backend.conditioning == "labels":
        return Conditions("labels", tuple(int(p) for p in prompts))
    if prompts:
        return Conditions("prompts", tuple(prompts))
    return Conditions()


def generation_conditions(spec: GenerationSpec, prep, *, learned: bool = False) -> Conditions:
    """What each of ``prep``'s samples is generated from, as loss terms see it (``Conditions``):
    its class label, its prompt (``sample_conditions``), or none — a tensor ``cond``, a learned
    ``embedding``, a ``learned`` conditioning (OptimizeEmbedding's vector or token, a token
    target's: their prompts hold the placeholder, which is no text to score an image against),
    or no conditioning at all. ``spec`` has passed ``prepare`` (one value or one per sample)."""
    if learned or spec.embedding or spec.cond is not None:
        return Conditions()

    def per_sample(values):
        return list(values) * prep.batch if len(values) == 1 else list(values)

    return sample_conditions(prep.backend, prompts=per_sample(spec.prompt),
                             labels=per_sample(spec.labels))


class Objective:
    """The request's terms, built (and so checked) once; called on each scored batch.

    ``reference``: the base model's outputs by domain for content terms (``set_reference`` per
    batch); ``conditions``: what the samples are generated from (``generation_conditions``): its
    kind is fixed here, for the whole request, and its values (when given) are those of the batch
    the objective scores until ``set_conditions`` sets the next batch's."""

    def __init__(self, ctx, backend, specs: list[LossSpec], job: Job, *, reference=None,
                 conditions: Conditions | None = None):
        conditions = Conditions() if conditions is None else conditions
        self.condition_kind = conditions.kind
        if not specs:
            raise InvalidArgument("give at least one loss term")
        if len(specs) > 16:
            raise InvalidArgument(f"at most 16 loss terms; got {len(specs)}")
        self.backend, self.job, self.specs = backend, job, specs
        self.decode_plan = None  # the decoder's (plan_decoder), for a backend that plans it
        self.iteration = 0
        self.terms, self.contexts = [], []
        for index, spec in enumerate(specs):
            if spec.domain not in ("image", "latent"):
                raise InvalidArgument(f"loss domain must be image or latent; got {spec.domain!r}")
            if not math.isfinite(spec.weight):
                raise InvalidArgument(f"loss term {index} has a non-finite weight")
            if spec.kind == "client":
                self.terms.append(RemoteLoss(self._asker(index, spec)))
            elif spec.kind == "server":
                context = LossContext(backend, ctx.settings, reference and reference[spec.domain],
                                      conditions.kind, conditions.values or None)
                self.contexts.append((spec.domain, context))
                self.terms.append(build_loss(spec.name, context, spec.params, spec.tensors))
            else:
                raise InvalidArgument(f"loss term {index} is neither a client nor a server loss")

    def plan_decoder(self, batch: int, budget: float | None, tile: int = 0) -> None:
        """Before any work: how the VAE decoder runs in this request's image-domain gradient of
        ``batch`` samples per pass within ``budget`` bytes (models/_decoding.py), in tiles of
        ``tile`` latent pixels when asked (approximate, models/_tiling.py); RESOURCE_EXHAUSTED
        naming the decoder when no plan fits. Nothing to plan without an image term."""
        if tile and not self.backend.plans_decoder:
            raise InvalidArgument(f"decoder_tile: {self.backend.name}'s images come from no VAE "
                                  "decoder to tile; leave it 0")
        if tile:
            check_tile(tile)  # a latent loss ignores a tile, but not a malformed one
        if self.needs_image and self.backend.plans_decoder:
            self.decode_plan = self.job.decoder_plan = self.backend.plan_decoder(batch, budget, tile)

    def reference_image(self, x0: torch.Tensor) -> torch.Tensor:
        """``x0`` decoded as this request's loss decodes (in its tiles when it asked), with no
        graph: a content reference or a verdict's start compares like with like."""
        with torch.no_grad():
            return self.backend.decode(x0.detach(), self.decode_plan)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """``x0`` decoded as planned; without an image term (images to show, a verdict) with no
        graph, which would otherwise live through the backward pass unplanned."""
        if not self.needs_image:
            with torch.no_grad():
                return self.backend.decode(x0.detach())
        return self.backend.decode(x0, self.decode_plan)

    def set_reference(self, reference: dict | None) -> None:
        """The unmodified outputs (by domain) matching the next call's batch, for content terms."""
        for domain, context in self.contexts:
            context.reference = None if reference is None else reference[domain]

    def set_conditions(self, conditions: Conditions | None) -> None:
        """What each sample of the next call's batch is generated from (None: unknown, so a term
        that reads it fails); of the kind the objective was built with."""
        if conditions is not None and conditions.kind != self.condition_kind:
            raise RuntimeError(f"this objective scores samples with {self.condition_kind} conditions; "
                               f"got {conditions.kind}")
        for _, context in self.contexts:
            context.conditions = None if conditions is None else conditions.values

    @property
    def needs_reference(self) -> bool:
        """Some server term reads the reference (``LossPlugin.uses_reference``); client terms
        never see it."""
        return any(spec.kind == "server" and term.uses_reference
                   for spec, term in zip(self.specs, self.terms))

    @property
    def needs_image(self) -> bool:
        return any(s.domain == "image" for s in self.specs)

    def _asker(self, index: int, spec: LossSpec):
        def ask(x, working):
            self.job.check()
            check_result(f"{'image' if spec.domain == 'image' else 'latent'} for the client loss "
                         f"{spec.name!r}", x, from_inputs=True)  # never send NaN to a client
            return self.job.ask(ClientQuery(index, spec.name, spec.domain, x, self.iteration, working))
        return ask

    def __call__(self, x0: torch.Tensor, images: torch.Tensor | None = None) -> "Evaluation":
        """The objective Σ_terms weight · Σ_samples loss (docs/design.md §4.3); ``images`` =
        decode(x0) when already computed."""
        if images is None and self.needs_image:
            images = self.decode(x0)
        total, values, per_sample = 0.0, [], torch.zeros(x0.shape[0], dtype=torch.float64)
        for spec, term in zip(self.specs, self.terms):
            losses = term(images if spec.domain == "image" else x0)
            if losses.shape != (x0.shape[0],):
                raise InvalidArgument(f"loss {spec.name!r} returned shape {tuple(losses.shape)}; "
                                      f"a loss gives one value per sample ({x0.shape[0]},)")
            term_total = losses.sum()
            values.append(float(term_total.detach()))
            per_sample += spec.weight * losses.detach().to("cpu", torch.float64)
            total = total + spec.weight * term_total
        return Evaluation(total, values, per_sample)


class Evaluation(NamedTuple):
    total: torch.Tensor           # differentiable: Σ_terms weight · Σ_samples loss
    values: list[float]           # each term's total, unweighted
    per_sample: torch.Tensor      # (B,) float64, detached: each sample's weighted loss
