"""scikit-learn's bundled 8×8 digits (1797 images, no download), split once and for all.

Images are scaled from [0, 16] to [−1, 1]. The split is a fixed permutation: the last 297 images
are held out for the classifier's test accuracy and the FD-digits reference statistics.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["load_digits_split", "HELD_OUT"]

HELD_OUT = 297


def load_digits_split(seed: int = 0) -> dict[str, torch.Tensor]:
    """``{"train_x", "train_y", "test_x", "test_y"}``; images (N, 1, 8, 8) in [−1, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(labels)))
    images, labels = images[order], labels[order]
    return {"train_x": images[:-HELD_OUT], "train_y": labels[:-HELD_OUT],
            "test_x": images[-HELD_OUT:], "test_y": labels[-HELD_OUT:]}
