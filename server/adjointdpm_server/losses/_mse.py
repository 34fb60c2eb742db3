"""``mse``: mean squared distance to a target (an image in [0, 1], or a latent)."""

from __future__ import annotations

import torch

from ..errors import InvalidArgument
from ._base import LossPlugin

__all__ = ["MSELoss"]


class MSELoss(LossPlugin):
    name = "mse"
    description = "mean squared error to a target image (or latent), per sample"
    tensors = {"target": "(C, H, W) or (B, C, H, W), same space as the loss's domain"}

    def __init__(self, context, params, tensors):
        super().__init__(context, params, tensors)
        if "target" not in tensors:
            raise InvalidArgument("mse needs the tensor input 'target'")
        self.target = tensors["target"]
        if not torch.isfinite(self.target).all():
            raise InvalidArgument("mse: the target has NaN or Inf entries")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        target = self.target.to(x.device, x.dtype)
        if target.dim() == x.dim() - 1:
            target = target.unsqueeze(0)
        if target.shape[1:] != x.shape[1:] or target.shape[0] not in (1, x.shape[0]):
            raise InvalidArgument(f"mse: target of shape {tuple(self.target.shape)} does not match "
                                  f"x of shape {tuple(x.shape)}")
        return (x - target).square().flatten(1).mean(1)
