"""``classifier``: −log p(class | image) under the model's own classifier (digits).

Guidance toward a class (paper §4.1.1, with the digits classifier standing in for an FGVC model);
with a negative weight, the security audit's objective (§4.1.2: push away from the true class).
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgument
from ._base import LossPlugin

__all__ = ["ClassifierLoss"]


class ClassifierLoss(LossPlugin):
    name = "classifier"
    description = "negative log-probability of `label` under the model's classifier (digits model)"
    params = {"label": "class 0–9, or a list with one per sample"}

    def __init__(self, context, params, tensors):
        super().__init__(context, params, tensors)
        if not context.backend.has_classifier:
            raise InvalidArgument("the classifier loss needs a model with a classifier (digits)")
        label = params.get("label")
        labels = label if isinstance(label, list) else [label]
        if not labels or not all(isinstance(v, (int, float)) and float(v).is_integer() and 0 <= v <= 9
                                 for v in labels):
            raise InvalidArgument(f"classifier: 'label' must be a class 0–9 or a list of them; got {label!r}")
        self.labels = torch.tensor([int(v) for v in labels])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.context.backend.classify(x)
        labels = self.labels.to(x.device)
        if labels.numel() not in (1, x.shape[0]):
            raise InvalidArgument(f"classifier: {labels.numel()} labels for a batch of {x.shape[0]}")
        return torch.nn.functional.cross_entropy(logits, labels.expand(x.shape[0]))
