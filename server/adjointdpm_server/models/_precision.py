"""Whether a network can compute in a dtype on a device, decided when the server starts.

Some builds lack half-precision kernels on some devices (float16 convolutions on older CPU
builds, bfloat16 on pre-Ampere GPUs): a server that learnt this at its first request would
fail every request. ``check_precision`` runs each kind of operation the backends' networks use
(convolution, linear, group and layer norm, SiLU/GELU, attention's softmax and batched matmul),
forward and backward, once on a tiny input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["PrecisionUnsupported", "check_precision"]


class PrecisionUnsupported(ValueError):
    """The device cannot run a network in the dtype; the message names what to use instead."""


def _alternatives(dtype: torch.dtype) -> str:
    others = [d for d in ("bfloat16", "float32") if getattr(torch, d) != dtype]
    return " or ".join(f"--dtype {d}" for d in others)


def _exercise(device, dtype) -> None:
    x = torch.randn(1, 4, 8, 8).to(device, dtype).requires_grad_()
    w = torch.randn(4, 4, 3, 3).to(device, dtype).requires_grad_()
    h = F.silu(F.group_norm(F.conv2d(x, w, padding=1), 2))
    q = h.flatten(2).transpose(1, 2)                                # (1, 64, 4) tokens
    q = F.layer_norm(F.linear(q, torch.eye(4, device=device, dtype=dtype)), (4,))
    attn = torch.softmax(torch.baddbmm(torch.zeros(1, 64, 64, device=device, dtype=dtype), q,
                                       q.transpose(1, 2)), dim=-1)
    out = F.gelu(torch.bmm(attn, q))
    out.float().sum().backward()
    for t in (out, x.grad, w.grad):
        if not bool(torch.isfinite(t.float()).all()):
            raise RuntimeError("a non-finite result on a tiny finite input")


def check_precision(device, dtype: torch.dtype) -> None:
    """Raise ``PrecisionUnsupported`` naming the alternative when ``dtype`` cannot work on ``device``."""
    try:
        _exercise(device, dtype)
    except (RuntimeError, NotImplementedError, TypeError) as err:
        name = str(dtype).removeprefix("torch.")
        raise PrecisionUnsupported(
            f"networks cannot run in {name} on {device} with this torch build ({err}); start the "
            f"server with {_alternatives(dtype)}") from None
