"""A loss computed elsewhere (the client, a Triton server): value and ∂L/∂x come back as numbers.

Autograd sees it as a function of ``x``: forward asks for (value, grad), backward returns
``grad_output · grad``. The caller supplies ``ask(x: np.ndarray) -> (value, grad)``.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ..errors import InvalidArgument
from ..integrity import check_input, check_number, safe_bound

__all__ = ["RemoteLoss", "check_reply"]


def check_reply(value, grad, shape, who: str, dtype=np.float32) -> tuple[float, np.ndarray]:
    """A remote answer is numbers we did not compute: finite and within the safe range of the
    working ``dtype`` (x's), and the gradient shaped like x."""
    value = float(value)
    grad = np.asarray(grad)
    if tuple(grad.shape) != tuple(shape):
        raise InvalidArgument(f"{who} returned a gradient of shape {tuple(grad.shape)} for x of "
                              f"shape {tuple(shape)}")
    if not math.isfinite(value):
        raise InvalidArgument(f"{who} returned a non-finite loss value ({value})")
    if not np.isfinite(grad).all():
        raise InvalidArgument(f"{who} returned a gradient with NaN or Inf entries")
    torch_dtype = torch.from_numpy(np.zeros(0, dtype=dtype)).dtype
    check_number(f"the loss value {who} returned", value, safe_bound(torch_dtype))
    check_input(f"the gradient {who} returned", grad, torch_dtype)
    return value, grad


class _Remote(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ask):
        value, grad = ask(x.detach().cpu().numpy())
        ctx.save_for_backward(torch.as_tensor(grad, dtype=x.dtype, device=x.device))
        return x.new_tensor(value)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None


class RemoteLoss:
    """``loss(x)``: a differentiable scalar whose value and gradient come from ``ask``."""

    def __init__(self, ask: Callable[[np.ndarray], tuple[float, np.ndarray]], who: str):
        self.ask, self.who = ask, who

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        def checked(array):
            value, grad = self.ask(array)
            return check_reply(value, grad, array.shape, self.who, array.dtype)

        return _Remote.apply(x, checked)
