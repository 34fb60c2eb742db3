"""Sample: x_T → x_0 → images, no gradient (the cheapest way through the model)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..integrity import check_result
from ._context import TaskContext
from ._generation import prepare, run_sampler
from ._images import to_png
from ._job import Job
from ._reply import check_reply_size, reply_bytes
from ._specs import GenerationSpec
from ._work import check_work, sample_work

__all__ = ["SampleResult", "run_sample"]


@dataclass
class SampleResult:
    x0: torch.Tensor
    x_T: torch.Tensor
    images: list[bytes]
    pixels: torch.Tensor | None


def run_sample(ctx: TaskContext, spec: GenerationSpec, job: Job, opts) -> SampleResult:
    """Sample with the request's options ``opts``: ``images`` (PNGs), ``pixels`` (float images)."""
    prep = prepare(ctx, spec)
    check_work(ctx.limits, sample_work(prep.steps, prep.solver))
    check_reply_size(ctx.limits, reply_bytes(prep, images=opts.images, pixels=opts.pixels, latents=2),
                     "result")
    with torch.no_grad():
        x0 = run_sampler(prep, job, grad_mode="none")
        decoded = prep.backend.decode(x0) if opts.images or opts.pixels else None
    check_result("x_0", x0, from_inputs=spec.has_client_numbers)
    return SampleResult(x0, prep.x_T, to_png(decoded) if opts.images else [],
                        decoded.float() if opts.pixels else None)
