"""A small CNN on 8×8 digits: the guidance loss, the audit filter and the FD-digits features."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitsClassifier"]


class DigitsClassifier(nn.Module):
    """Images in [−1, 1], shape (B, 1, 8, 8) → 10 logits; :meth:`features` is the 128-d penultimate."""

    def __init__(self, width: int = 32, features: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
            nn.AvgPool2d(2),  # 4×4
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(),
            nn.AvgPool2d(2),  # 2×2
            nn.Flatten(),
            nn.Linear(8 * width, features), nn.GELU(),
        )
        self.head = nn.Linear(features, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
