"""Numbers we did not compute are checked before we use them, and numbers we computed before we
send them: no NaN, no Inf, nothing so large that its square overflows the working dtype.

The *safe range* of a dtype is |v| ≤ √(finfo.max) (≈ 1.8e19 in float32): a norm, an MSE or a
Gram matrix of such values stays finite. Values are checked after conversion to the working
dtype, so a float64 1e300 that would become Inf in float32 is refused, not propagated.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import InvalidArgument, ServiceError

__all__ = ["safe_bound", "check_input", "check_number", "check_result", "NonFiniteResult",
           "MAX_WEIGHT", "MAX_PARAM"]

MAX_WEIGHT = 1e6   # a loss term's weight
MAX_PARAM = 1e12   # a numeric loss parameter


class NonFiniteResult(ServiceError):
    """A result that is not finite though every input was: a bug or an unstable model."""

    code = "INTERNAL"


def safe_bound(dtype) -> float:
    dtype = torch.empty(0, dtype=dtype).dtype if not isinstance(dtype, torch.dtype) else dtype
    return math.sqrt(torch.finfo(dtype).max)


def check_input(name: str, value, dtype) -> None:
    """``value`` (array or tensor) converted to ``dtype`` is finite and within the safe range."""
    t = value.detach() if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
    if not t.is_floating_point():
        return
    t = t.to(dtype)
    if t.numel() == 0:
        return
    if not bool(torch.isfinite(t).all()):
        raise InvalidArgument(f"{name} has NaN or Inf entries (in {str(dtype).removeprefix('torch.')})")
    peak, bound = float(t.abs().max()), safe_bound(dtype)
    if peak > bound:
        raise InvalidArgument(f"{name} has entries of magnitude {peak:.3g}; at most {bound:.3g} is "
                              f"accepted in {str(dtype).removeprefix('torch.')}")


def check_number(name: str, value: float, bound: float) -> float:
    value = float(value)
    if not math.isfinite(value) or abs(value) > bound:
        raise InvalidArgument(f"{name} must be finite and at most {bound:g} in magnitude; got {value:.3g}")
    return value


def check_result(name: str, value, *, from_inputs: bool) -> None:
    """A result about to be sent is finite; else INVALID_ARGUMENT when the request's own numbers
    (tensors, a client loss) drove it there, INTERNAL otherwise."""
    t = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        if from_inputs:
            raise InvalidArgument(f"the {name} is not finite: the request's inputs drive the "
                                  "computation out of range")
        raise NonFiniteResult(f"non-finite result ({name}); the inputs were finite")
