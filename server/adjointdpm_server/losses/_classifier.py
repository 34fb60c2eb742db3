"""``classifier``: a loss on the model's own classifier's verdict (digits), per sample.

Three modes (docs/design.md §4.3):

- ``targeted`` (default): −log p(label | x), guidance toward a class (paper §4.1.1, with the digits
  classifier standing in for an FGVC model);
- ``untargeted``: −log(1 − p(label | x)), away from the true class: bounded below by 0, unlike a
  negated cross-entropy, so one sample cannot run to −∞ and drown the others (§4.1.2's audit);
- ``margin``: Carlini–Wagner's margin max(z_label − max_{j≠label} z_j, −κ) on the logits z: at its
  floor −κ the verdict has left ``label`` by a margin κ and the gradient stops.

Without ``label`` each sample's label is the class it was generated with (``LossContext.labels``):
a fine-tune over a set of labels trains each drawn sample toward its own class. A request whose
samples are not generated from class labels must give ``label``: refused when the plugin is built.
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgument
from ._base import LossPlugin

__all__ = ["ClassifierLoss", "MODES"]

MODES = ("targeted", "untargeted", "margin")


class ClassifierLoss(LossPlugin):
    name = "classifier"
    description = ("the model's classifier (digits) per sample: targeted −log p(label), untargeted "
                   "−log(1 − p(label)), or margin max(z_label − max other z, −kappa); `label` "
                   "defaults to each sample's own generation label")
    params = {"label": "class 0–9, or a list with one per sample; default: each sample's own "
                       "generation label (a label-conditioned model)",
              "mode": "targeted (default), untargeted or margin",
              "kappa": "margin mode: the confidence margin κ ≥ 0 (default 0)"}

    def __init__(self, context, params, tensors):
        super().__init__(context, params, tensors)
        if not context.backend.has_classifier:
            raise InvalidArgument("the classifier loss needs a model with a classifier (digits)")
        label = params.get("label")
        if label is None:  # each sample's own class, set per scored batch
            context.require_own("labels", "classifier", "label", "a class 0–9 or a list of them")
            self.labels = None
        else:
            labels = label if isinstance(label, list) else [label]
            if not labels or not all(isinstance(v, (int, float)) and float(v).is_integer()
                                     and 0 <= v <= 9 for v in labels):
                raise InvalidArgument(f"classifier: 'label' must be a class 0–9 or a list of them; "
                                      f"got {label!r}")
            self.labels = torch.tensor([int(v) for v in labels])
        self.mode = params.get("mode", "targeted")
        if self.mode not in MODES:
            raise InvalidArgument(f"classifier: 'mode' must be one of {', '.join(MODES)}; got {self.mode!r}")
        self.kappa = self.number(params, "kappa", 0.0, low=0.0, high=1e3)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.context.backend.classify(x).float()
        labels = (torch.tensor(self.context.labels(x.shape[0])) if self.labels is None
                  else self.labels).to(x.device)
        if labels.numel() not in (1, x.shape[0]):
            raise InvalidArgument(f"classifier: {labels.numel()} labels for a batch of {x.shape[0]}")
        labels = labels.expand(x.shape[0])
        own = logits.gather(1, labels[:, None])[:, 0]
        others = logits.scatter(1, labels[:, None], float("-inf"))
        if self.mode == "targeted":
            return logits.logsumexp(1) - own
        if self.mode == "untargeted":  # −log(1 − p) = logsumexp(all) − logsumexp(others): stable at p → 1
            return logits.logsumexp(1) - others.logsumexp(1)
        return (own - others.amax(1)).clamp_min(-self.kappa)
