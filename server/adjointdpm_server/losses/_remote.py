"""A loss computed elsewhere (the client, a Triton server): value and ∂L/∂x come back as numbers.

Autograd sees it as a function of ``x``: forward asks for the answer, backward returns
``grad_output · grad``. The caller supplies ``ask(x: np.ndarray, dtype) -> LossAnswer``, checked
where it entered the server (``check_reply``), never again here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import InvalidArgument
from ..integrity import check_input, check_number, safe_bound

__all__ = ["RemoteLoss", "LossAnswer", "check_reply", "wire_array"]


@dataclass(frozen=True)
class LossAnswer:
    """A remote loss's answer after ``check_reply``: what the server's arithmetic may trust."""

    values: np.ndarray  # (B,) float64: each sample's loss, summing to the term's value
    grad: np.ndarray    # x's shape: ∂value/∂x, finite and within the working dtype's safe range


def check_reply(value, grad, shape, who: str, working: torch.dtype = torch.float32,
                values=None) -> LossAnswer:
    """A remote answer is numbers we did not compute, checked once where it enters (the stream's
    edge for a client, the Triton plugin for Triton): finite and within the safe range of the
    ``working`` dtype (x's: what the answer will be used in; bfloat16 has float32's range), the
    gradient shaped like x, per-sample ``values`` (if any) one per sample and summing to
    ``value``; without ``values`` each sample is credited value / batch."""
    value = float(value)
    grad = np.asarray(grad)
    if tuple(grad.shape) != tuple(shape):
        raise InvalidArgument(f"{who} returned a gradient of shape {tuple(grad.shape)} for x of "
                              f"shape {tuple(shape)}")
    if not math.isfinite(value):
        raise InvalidArgument(f"{who} returned a non-finite loss value ({value})")
    if not np.isfinite(grad).all():
        raise InvalidArgument(f"{who} returned a gradient with NaN or Inf entries")
    bound = safe_bound(working)
    check_number(f"the loss value {who} returned", value, bound)
    check_input(f"the gradient {who} returned", grad, working)
    batch = shape[0]
    if values is None or len(values) == 0:
        return LossAnswer(np.full(batch, value / batch), grad)
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (batch,):
        raise InvalidArgument(f"{who} returned {values.size} per-sample values for a batch of {batch}")
    for v in values:
        check_number(f"a per-sample value {who} returned", float(v), bound)
    if abs(values.sum() - value) > 1e-3 * max(1.0, abs(value)):
        raise InvalidArgument(f"{who} returned per-sample values summing to {values.sum():.6g}, "
                              f"not to its value {value:.6g}")
    return LossAnswer(values, grad)


def wire_array(x: torch.Tensor) -> np.ndarray:
    """``x`` as the peer sees it: a dtype numpy has whatever the server computes in (half
    precision travels as float32, float64 stays float64), so a client never meets bfloat16."""
    x = x.detach().cpu()
    return (x if x.dtype == torch.float64 else x.float()).numpy()


class _Remote(torch.autograd.Function):
    """Per-sample values out; back, sample i gets its own slice of the gradient scaled by its
    cotangent (exact for a sum of per-sample losses, and for any loss under a uniform cotangent,
    which is what the objective's sum gives)."""

    @staticmethod
    def forward(ctx, x, ask):
        answer = ask(wire_array(x))
        ctx.save_for_backward(torch.as_tensor(answer.grad, dtype=x.dtype, device=x.device))
        return torch.as_tensor(answer.values, dtype=x.dtype, device=x.device)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad_output.view(-1, *[1] * (grad.dim() - 1)).to(grad.dtype) * grad, None


class RemoteLoss:
    """``loss(x)``: per-sample losses whose values and gradient come from ``ask(array, dtype)``,
    which returns a ``LossAnswer`` already checked by its edge (``check_reply``) for x's dtype."""

    def __init__(self, ask: Callable[[np.ndarray, torch.dtype], LossAnswer]):
        self.ask = ask

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _Remote.apply(x, lambda array: self.ask(array, x.dtype))
