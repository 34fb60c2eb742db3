"""``gram_style``: the paper's stylization loss (eq. 13) — Gram matrices of features of a style
image, plus an optional content term to what the unmodified model made (``reference``).

Features come from the backend (``style_features``: the digits classifier, SD's VAE encoder;
VGG weights cannot be downloaded here).
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgument
from ._base import LossPlugin

__all__ = ["GramStyleLoss", "gram"]


def gram(f: torch.Tensor) -> torch.Tensor:
    """G = F Fᵀ / (C·H·W) per sample (Gatys et al.)."""
    b, c = f.shape[:2]
    f = f.reshape(b, c, -1)
    return f @ f.transpose(1, 2) / f[0].numel()


class GramStyleLoss(LossPlugin):
    name = "gram_style"
    description = ("style: MSE between Gram matrices of the backend's features of x and of `style`; "
                   "plus content_weight × feature MSE to the unmodified output (paper eq. 13)")
    params = {"content_weight": "weight of the content term (default 0)"}
    tensors = {"style": "the style reference image (C, H, W) in [0, 1]",
               "content": "optional content images (B, C, H, W); default: the request's reference"}

    def __init__(self, context, params, tensors):
        super().__init__(context, params, tensors)
        style = tensors.get("style")
        shape = tuple(context.backend.image_shape)
        if style is None:
            raise InvalidArgument("gram_style needs the tensor input 'style'")
        if style.dim() == 3:
            style = style.unsqueeze(0)
        if style.dim() != 4 or (shape and tuple(style.shape[1:]) != shape) or style.shape[0] != 1:
            raise InvalidArgument(f"gram_style: 'style' must be one image of shape {shape}; got "
                                  f"{tuple(tensors['style'].shape)}")
        self.content_weight = self.number(params, "content_weight", 0.0, low=0.0)
        self.content = tensors.get("content")
        backend = context.backend
        with torch.no_grad():
            feats = backend.style_features(style.to(backend.device, backend.dtype))
            self.style_grams = [gram(f) for f in feats]

    @property
    def uses_reference(self) -> bool:
        """The content term compares with the reference unless ``content`` images are given."""
        return bool(self.content_weight) and self.content is None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.context.backend.style_features(x)
        loss = sum((gram(f) - g.to(f.dtype)).square().flatten(1).sum(1)
                   for f, g in zip(feats, self.style_grams))
        if self.content_weight:
            content = self.content if self.content is not None else self.context.reference
            if content is None:
                raise InvalidArgument("gram_style: content_weight needs a 'content' tensor or a "
                                      "task with a reference output (fine-tuning, latent optimization)")
            with torch.no_grad():
                targets = self.context.backend.style_features(content.to(x.device, x.dtype))
            loss = loss + self.content_weight * sum(
                (f - t).square().flatten(1).mean(1) for f, t in zip(feats, targets))
        return loss
