"""The request's loss: a weighted sum of client-side and server-side terms on the image or x_0.

Client terms become ``RemoteLoss`` calls that send ``x`` over the job's stream and wait for the
answer; server terms are plugins from the registry.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..errors import InvalidArgument
from ..integrity import check_result
from ..losses import LossContext, RemoteLoss, build_loss
from ._job import ClientQuery, Job
from ._specs import LossSpec

__all__ = ["Objective", "Evaluation"]


class Objective:
    def __init__(self, ctx, backend, specs: list[LossSpec], job: Job, *, reference=None):
        if not specs:
            raise InvalidArgument("give at least one loss term")
        if len(specs) > 16:
            raise InvalidArgument(f"at most 16 loss terms; got {len(specs)}")
        self.backend, self.job, self.specs = backend, job, specs
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
                context = LossContext(backend, ctx.settings, reference and reference[spec.domain])
                self.contexts.append((spec.domain, context))
                self.terms.append(build_loss(spec.name, context, spec.params, spec.tensors))
            else:
                raise InvalidArgument(f"loss term {index} is neither a client nor a server loss")

    def set_reference(self, reference: dict | None) -> None:
        """The unmodified outputs (by domain) matching the next call's batch, for content terms."""
        for domain, context in self.contexts:
            context.reference = None if reference is None else reference[domain]

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
            images = self.backend.decode(x0)
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
