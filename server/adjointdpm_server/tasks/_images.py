"""Images in [0, 1], (B, C, H, W) → one PNG per sample (grey for C = 1, RGB for C = 3)."""

from __future__ import annotations

import io

import numpy as np
import torch

__all__ = ["to_png"]


def to_png(images: torch.Tensor) -> list[bytes]:
    from PIL import Image

    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    out = []
    for img in pixels:
        if img.shape[0] == 1:
            picture = Image.fromarray(img[0], mode="L")
        elif img.shape[0] in (3, 4):
            picture = Image.fromarray(np.ascontiguousarray(img[:3].transpose(1, 2, 0)), mode="RGB")
        else:
            raise ValueError(f"cannot write {img.shape[0]}-channel images as PNG")
        buf = io.BytesIO()
        picture.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out
