"""`gaussian-mixture`: the core's analytic ε* as a backend — exact, instant, for end-to-end tests.

Ten isotropic components whose means are the class-mean images of the digits data set, so that
the 64-d vectors show as 8×8 pictures. ``cond`` (shape (B, 1, 8, 8)) is added to every mean.
"""

from __future__ import annotations

import torch

from ..core import GaussianMixture, VPSchedule
from ._base import Conditioning, ModelBackend

__all__ = ["GaussianMixtureBackend"]


class GaussianMixtureBackend(ModelBackend):
    name = "gaussian-mixture"
    latent_shape = (1, 8, 8)
    image_shape = (1, 8, 8)
    default_steps = 20
    default_guidance = None

    def __init__(self, scale: float = 0.25, device="cpu", dtype=torch.float32):
        from ._digits_data import load_digits_split

        data = load_digits_split()
        means = torch.stack([data["train_x"][data["train_y"] == k].mean(0) for k in range(10)])
        self.schedule = VPSchedule.linear()
        self.eps_fn = GaussianMixture(self.schedule, means, torch.full((10,), scale)).to(device, dtype)
        self.eps_fn.requires_grad_(False)  # the resident model is never trained in place

    def encode(self, batch: int, *, prompt=None, labels=None, negative_prompt=None) -> Conditioning:
        if prompt is not None or labels is not None:
            raise ValueError("the gaussian-mixture model takes a conditioning tensor, not a prompt or label")
        zeros = torch.zeros((batch, *self.latent_shape), device=self.device, dtype=self.dtype)
        return Conditioning(zeros, zeros.clone())

    def decode(self, x0: torch.Tensor, plan=None) -> torch.Tensor:
        return ((x0 + 1.0) / 2.0).clamp(0.0, 1.0)
