"""What a network predicts, turned into ε inside the field (differentiably).

Every supported target is affine in ``x`` at fixed ``t``, so ``ε = a·out + b·x`` with ``(a, b)``
from the path's ``α, σ`` (and ``α̇, σ̇`` for velocity). Classifier-free guidance combines the raw
outputs first; the two orders agree because the map is affine with the same ``(a, b)`` for the
conditional and unconditional halves.

- ``epsilon``: ``out = ε``.
- ``v`` (Salimans & Ho 2022): ``out = α ε − σ x_0``, so ``ε = (α v + σ x)/(α² + σ²)``.
- ``velocity`` (flow matching): ``out = dx/dτ = α̇ x_0 + σ̇ ε``, τ the path's velocity time
  (σ for a flow path: ``u = ε − x_0``), so ``ε = (α u − α̇ x)/(α σ̇ − α̇ σ)``.
- ``sample``: ``out = x_0``, so ``ε = (x − α x_0)/σ``.
"""

from __future__ import annotations

__all__ = ["PREDICTIONS", "check_prediction", "eps_coefficients"]

PREDICTIONS = ("epsilon", "v", "velocity", "sample")


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
    return prediction


def eps_coefficients(prediction: str, alpha, sigma, dalpha=None, dsigma=None):
    """``(a, b)`` with ``ε = a·out + b·x`` (floats or tensors alike)."""
    if prediction == "epsilon":
        return 1.0, 0.0
    if prediction == "v":
        norm = alpha * alpha + sigma * sigma
        return alpha / norm, sigma / norm
    if prediction == "velocity":
        det = alpha * dsigma - dalpha * sigma
        return alpha / det, -dalpha / det
    if prediction == "sample":
        return -alpha / sigma, 1.0 / sigma
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
