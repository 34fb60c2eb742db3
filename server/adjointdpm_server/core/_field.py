"""The right-hand side of the reparameterized probability-flow ODE (paper eq. 10).

``dy/dρ = ε̃(α(ρ)·y, t(ρ), c)`` with ``y = x/α`` and classifier-free guidance
``ε̃ = s·ε(x,t,c) + (1−s)·ε(x,t,∅)``; cond and uncond go through the network as one batch.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from ._blocks import BlockCheckpointing
from ._prediction import check_prediction, eps_coefficients

__all__ = ["HALF_DTYPES", "Node", "GuidedEps", "NetworkVJP", "SharedRows", "nodes_from_times",
           "node_at_rho"]

#: network precisions whose solver state, CFG and gradient sums stay in float32 (docs/design.md §2.4.2)
HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Node:
    """A point of the time grid: ``t``, ``ρ_t`` and ``α_t`` as float64 Python floats."""

    t: float
    rho: float
    alpha: float


def nodes_from_times(schedule, ts: torch.Tensor) -> list[Node]:
    ts = ts.to(torch.float64)
    rhos, alphas = schedule.rho(ts), schedule.alpha(ts)
    return [Node(float(t), float(r), float(a)) for t, r, a in zip(ts, rhos, alphas)]


def node_at_rho(schedule, rho: float) -> Node:
    """The node at an arbitrary ρ (adaptive solvers); α from the path (``1/√(1+ρ²)`` for VP)."""
    t = float(schedule.t_from_rho(torch.tensor(rho, dtype=torch.float64)))
    return Node(t, rho, schedule.alpha_from_rho(rho))


class NetworkVJP(abc.ABC):
    """A network that computes its own vector–Jacobian product w.r.t. its inputs.

    A wrapper declares this (the service's batching engine does) so that a backward step hands
    the network call and its cotangent over in one piece — one forward with grad and one
    ``autograd.grad``, which can then be batched with other requests' calls. Weight gradients
    take this path only when the network declares ``splits_weights``: each request's weights
    act on its own rows alone (a LoRA adapter in a :class:`SharedRows` batch), so the gradient of
    one batched call w.r.t. them is that request's alone; a summed gradient of shared weights
    could not be split between requests.
    """

    splits_weights: bool = False

    @abc.abstractmethod
    def vjp(self, x: torch.Tensor, t: torch.Tensor, cond, cotangent: torch.Tensor,
            cond_grad: bool, weights: tuple = ()) -> tuple:
        """``(ε, cotangentᵀ ∂ε/∂x, cotangentᵀ ∂ε/∂cond if cond_grad else None,
        (cotangentᵀ ∂ε/∂w for w in weights))``."""


class SharedRows(abc.ABC):
    """One of several networks sharing a base, each row of a batch naming its own (per-row
    LoRA adapters on one resident model, S-LoRA's batching): calls of networks with equal
    ``shares`` may be concatenated and run as one call through :meth:`run_rows`. A backend
    declares it; a scheduler reads it and never asks the network anything else."""

    @property
    @abc.abstractmethod
    def shares(self) -> object:
        """What calls must agree on to run as one (hashable)."""

    @abc.abstractmethod
    def run_rows(self, x: torch.Tensor, t: torch.Tensor, cond, parts: list) -> torch.Tensor:
        """The output of one call whose rows come from ``parts``: ``(network, rows)`` pairs in
        order, every network sharing this one's ``shares``."""


class GuidedEps:
    """``ε̃(y, node, cond, uncond)``: the model's noise prediction at ``x = α y``, with CFG.

    A network that predicts something else (``prediction``: v, velocity, x_0) is turned into ε
    after the CFG combination: ``ε = a·out + b·x`` (core/_prediction.py). A network in another
    precision (``network_dtype``, e.g. bfloat16) gets its inputs cast to it and its output cast
    back, so the solver state, the CFG combination and every gradient stay in the state's dtype.
    """

    def __init__(self, eps_fn, guidance_scale: float | None = None, *, prediction: str = "epsilon",
                 schedule=None, network_dtype: torch.dtype | None = None):
        self.eps_fn = eps_fn
        self.network_dtype = network_dtype
        self.guidance_scale = guidance_scale
        self.prediction = check_prediction(prediction)
        if prediction == "velocity" and schedule is None:
            raise ValueError("prediction='velocity' needs the schedule (its α̇, σ̇)")
        self.schedule = schedule
        self.nfe = 0
        self._checked = False
        self._coefficients: dict[Node, tuple[float, float]] = {}

    def coefficients(self, node: Node) -> tuple[float, float]:
        """``(a, b)`` of ``ε = a·out + b·x`` at ``node`` (float64, cached per node)."""
        ab = self._coefficients.get(node)
        if ab is None:
            dalpha = dsigma = None
            if self.prediction == "velocity":
                da, ds = self.schedule.velocity_coefficients(torch.tensor(node.t, dtype=torch.float64))
                dalpha, dsigma = float(da), float(ds)
            a, b = eps_coefficients(self.prediction, node.alpha, node.rho * node.alpha, dalpha, dsigma)
            ab = self._coefficients[node] = (float(a), float(b))
        return ab

    @property
    def guided(self) -> bool:
        return self.guidance_scale is not None and self.guidance_scale != 1.0

    @staticmethod
    def _inputs(y: torch.Tensor, node: Node) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's ``x = α y`` and per-sample ``t`` (at least float32: in fp16, t ≈ 999.3
        would round to 999.5)."""
        x = y * node.alpha
        t_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return x, torch.full((x.shape[0],), node.t, dtype=t_dtype, device=x.device)

    def _net(self, value):
        """A floating input in the network's precision (a differentiable cast; others pass)."""
        if (self.network_dtype is None or not isinstance(value, torch.Tensor)
                or not value.is_floating_point() or value.dtype == self.network_dtype):
            return value
        return value.to(self.network_dtype)

    @staticmethod
    def _like(value, like):
        """``value`` back in ``like``'s dtype (a differentiable cast; non-tensors pass)."""
        if isinstance(value, torch.Tensor) and isinstance(like, torch.Tensor) and value.dtype != like.dtype:
            return value.to(like.dtype)
        return value

    def _call(self, x, t, cond, like: torch.Tensor):
        return self._like(self.eps_fn(self._net(x), t, self._net(cond)), like)

    def __call__(self, y: torch.Tensor, node: Node, cond, uncond) -> torch.Tensor:
        x, t = self._inputs(y, node)
        batch = x.shape[0]
        if self.guided:
            both = self._call(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond]), x)
            self._check(both, (2 * batch,) + tuple(x.shape[1:]))
            eps_c, eps_u = both.chunk(2)
            eps = eps_u + self.guidance_scale * (eps_c - eps_u)
        else:
            eps = self._call(x, t, cond, x)
            self._check(eps, tuple(x.shape))
        self.nfe += 1
        if self.prediction == "epsilon":
            return eps
        a, b = self.coefficients(node)
        return a * eps + b * x

    @property
    def has_network_vjp(self) -> bool:
        return isinstance(self.eps_fn, NetworkVJP)

    @property
    def checkpoints_blocks(self) -> bool:
        """Whether the network declares :class:`BlockCheckpointing` (core/_blocks.py)."""
        return isinstance(self.eps_fn, BlockCheckpointing) and bool(self.eps_fn.checkpoints_blocks)

    @property
    def network_splits_weights(self) -> bool:
        """Whether the network's own VJP also gives its weights' gradients (``splits_weights``)."""
        return self.has_network_vjp and self.eps_fn.splits_weights

    def vjp(self, y: torch.Tensor, node: Node, cond, uncond, cotangent: torch.Tensor,
            cond_grad: bool, uncond_grad: bool, weights: tuple = ()):
        """``(ε̃, ȳ, c̄, ū, w̄)`` through the network's own VJP (``has_network_vjp``): with
        ``x = α y`` and ``ε̃ = s ε_c + (1−s) ε_u`` the cotangents on the two halves of the CFG
        batch are ``s·ε̄`` and ``(1−s)·ε̄``, and ``ȳ = α (x̄_c + x̄_u)``; a prediction turned into
        ε by ``a·out + b·x`` scales the network's cotangent by ``a`` and adds ``α b ε̄`` to ``ȳ``."""
        x, t = self._inputs(y, node)
        batch = x.shape[0]
        a, b = self.coefficients(node)
        direct = cotangent
        if self.prediction != "epsilon":
            cotangent = cotangent * a
        if self.guided:
            s = self.guidance_scale
            both, gx, gc, gw = self._network_vjp(torch.cat([x, x]), torch.cat([t, t]),
                                                 torch.cat([cond, uncond]),
                                                 torch.cat([s * cotangent, (1.0 - s) * cotangent]),
                                                 cond_grad or uncond_grad, weights)
            self._check(both, (2 * batch,) + tuple(x.shape[1:]))
            eps_c, eps_u = both.chunk(2)
            eps = eps_u + s * (eps_c - eps_u)
            gx_c, gx_u = gx.chunk(2)
            grad_y = (gx_c + gx_u) * node.alpha
            c_bar, u_bar = gc.chunk(2) if gc is not None else (None, None)
        else:
            eps, gx, c_bar, gw = self._network_vjp(x, t, cond, cotangent, cond_grad, weights)
            self._check(eps, tuple(x.shape))
            grad_y, u_bar = gx * node.alpha, None
        self.nfe += 1
        if self.prediction != "epsilon":
            eps = a * eps + b * x
            grad_y = grad_y + (node.alpha * b) * direct
        return eps, grad_y, c_bar if cond_grad else None, u_bar if uncond_grad else None, gw

    def _network_vjp(self, x, t, cond, cotangent, cond_grad, weights=()):
        """The network's own VJP, in its precision, with every result back in the state's (the
        weights' gradients stay in their own dtype)."""
        eps, gx, gc, gw = self.eps_fn.vjp(self._net(x), t, self._net(cond), self._net(cotangent),
                                          cond_grad, tuple(weights))
        return self._like(eps, x), self._like(gx, x), self._like(gc, cond), gw

    def _check(self, eps, shape) -> None:
        if self._checked:
            return
        if not isinstance(eps, torch.Tensor) or tuple(eps.shape) != shape:
            got = tuple(eps.shape) if isinstance(eps, torch.Tensor) else type(eps).__name__
            raise ValueError(f"eps_fn returned {got}; expected a tensor of shape {shape}")
        self._checked = True
