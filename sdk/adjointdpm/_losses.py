"""Loss terms as the SDK sees them: client-side functions (registered with ``@loss``) and
server-side plugins by name. A client loss never leaves this process: the server sends x_0 and
this process answers with the value and the gradient."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

__all__ = ["loss", "registered_losses", "ClientLoss", "ServerLoss", "evaluate_client_loss",
           "evaluate_client_loss_async"]

_REGISTRY: dict[str, "ClientLoss"] = {}


def _torch_available() -> bool:
    """Whether torch is installed, without importing it (defining a loss stays cheap)."""
    import importlib.util

    return importlib.util.find_spec("torch") is not None


@dataclass
class ClientLoss:
    """``fn(x)`` on the image in [0, 1] (B, C, H, W) or on x_0 (``domain="latent"``).

    ``autograd=True``: ``x`` is a float32 torch tensor and ``fn`` returns a scalar tensor (the SDK
    differentiates it); ``autograd=False``: ``x`` is a numpy array and ``fn`` returns
    ``(value, grad)``. The default is torch when it is installed.
    """

    fn: Callable
    name: str = ""
    weight: float = 1.0
    domain: str = "image"
    autograd: bool | None = None

    def __post_init__(self):
        self.name = self.name or getattr(self.fn, "__name__", "loss")
        if self.autograd is None:
            self.autograd = _torch_available()


@dataclass
class ServerLoss:
    """A plugin on the server (``Client.list_losses()`` names them) with its inputs."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    tensors: Mapping[str, Any] = field(default_factory=dict)
    weight: float = 1.0
    domain: str = "image"


def loss(name: str | None = None, *, domain: str = "image", autograd: bool | None = None):
    """Register a client-side loss under ``name``: ``@adjointdpm.loss("to_eight")``."""
    def register(fn: Callable) -> Callable:
        term = ClientLoss(fn, name or fn.__name__, 1.0, domain, autograd)
        _REGISTRY[term.name] = term
        fn.adjointdpm_loss = term
        return fn
    return register


def registered_losses() -> dict[str, ClientLoss]:
    return dict(_REGISTRY)


def as_term(item) -> ClientLoss | ServerLoss:
    """A loss given as a term, a registered name, a decorated or a plain function."""
    if isinstance(item, (ClientLoss, ServerLoss)):
        return item
    if isinstance(item, str):
        if item not in _REGISTRY:
            raise KeyError(f"no client loss {item!r} is registered (use @adjointdpm.loss); for a "
                           "server plugin pass adjointdpm.ServerLoss(name)")
        return _REGISTRY[item]
    if callable(item):
        return getattr(item, "adjointdpm_loss", None) or ClientLoss(item)
    raise TypeError(f"not a loss: {item!r}")


def evaluate_client_loss(term: ClientLoss, x: np.ndarray) -> tuple[float, np.ndarray, list[float]]:
    """The value, ∂value/∂x and (when the function gives one per sample) the per-sample values of a
    client loss at ``x``. A function may return one value per sample (shape (B,)): the term is
    then their sum, as the server's objective is (a sample's gradient does not depend on the batch)."""
    arg = loss_input(term, x)
    return loss_output(term, x, arg, term.fn(arg))


async def evaluate_client_loss_async(term: ClientLoss, x: np.ndarray) -> tuple[float, np.ndarray, list[float]]:
    """As :func:`evaluate_client_loss`, for a loss that may be a coroutine function (awaited)."""
    import inspect

    arg = loss_input(term, x)
    out = term.fn(arg)
    if inspect.isawaitable(out):
        out = await out
    return loss_output(term, x, arg, out)


def loss_input(term: ClientLoss, x: np.ndarray):
    """What ``term.fn`` is called with: a float32 tensor requiring grad, or a numpy copy."""
    if term.autograd:
        import torch

        return torch.from_numpy(np.array(x, dtype=np.float32)).requires_grad_()
    return np.array(x)


def loss_output(term: ClientLoss, x: np.ndarray, arg, out) -> tuple[float, np.ndarray, list[float]]:
    """(total, ∂total/∂x, per-sample values) from what ``term.fn(arg)`` returned."""
    if term.autograd:
        import torch

        if isinstance(out, tuple):
            value, grad = out
            total, per_sample = _values(term, value, x.shape[0])
            return total, np.asarray(grad, dtype=np.float32), per_sample
        if not isinstance(out, torch.Tensor) or out.numel() not in (1, x.shape[0]) or out.dim() > 1:
            raise TypeError(f"client loss {term.name!r} must return a scalar tensor, one value per "
                            "sample, or (value, grad)")
        (grad,) = torch.autograd.grad(out.sum(), arg, allow_unused=True)
        grad = torch.zeros_like(arg) if grad is None else grad
        total, per_sample = _values(term, out.detach().numpy(), x.shape[0])
        return total, grad.detach().numpy(), per_sample
    value, grad = out
    total, per_sample = _values(term, value, x.shape[0])
    return total, np.asarray(grad, dtype=np.float32), per_sample


def _values(term: ClientLoss, value, batch: int) -> tuple[float, list[float]]:
    """(total, per-sample values or []) from a scalar or a (B,) array."""
    array = np.asarray(value, dtype=np.float64)
    if array.ndim == 0 or (array.size == 1 and batch != 1):
        return float(array.reshape(())), []
    if array.shape != (batch,):
        raise TypeError(f"client loss {term.name!r} returned shape {array.shape}; give a scalar or "
                        f"one value per sample ({batch},)")
    return float(array.sum()), array.tolist()
