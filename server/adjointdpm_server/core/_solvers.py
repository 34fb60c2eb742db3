"""Solvers for ``dy/dρ = ε̃`` (paper eq. 10) and the name → solver registry.

Two families, each with a forward solve and the vector–Jacobian recursion of its own update, so
that the ``checkpoint`` gradient is the exact gradient of the discrete sampler and the ``adjoint``
gradient is the same recursion run on a trajectory re-solved backward (docs/design.md §2):

- :class:`LinearMultistep`: ``y_{i+1} = y_i + Σ_j W_ij ε_{i−j} + Σ_j A_ij y_{i−j}`` with weights
  fixed by the grid — ``euler`` (= DDIM), ``dpm2``/``dpm3`` (ε a polynomial in λ, integrated
  exactly against dρ: DPM-Solver-K multistep, noise form), ``dpmpp2``/``dpmpp3`` (the data
  prediction x̂_0 = y − ρε a polynomial in λ, integrated exactly against e^λ dλ: DPM-Solver++
  multistep, data form, which holds up better at few steps under guidance) and ``ab2``–``ab4``
  (ε a polynomial in ρ: variable-step Adams–Bashforth, the paper's choice); lower orders
  bootstrap the first steps. Only the data form has y-terms (A ≠ 0).
- :class:`OneStep`: ``heun`` (explicit trapezoid in ρ) and ``dopri5`` (adaptive Dormand–Prince via
  torchdiffeq, restarted at every grid node so that each segment can be recomputed exactly).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ._field import GuidedEps, Node, node_at_rho
from ._flow_schedule import Schedule
from ._memory import RankedAnchors

__all__ = ["SOLVERS", "get_solver", "LinearMultistep", "OneStep", "Heun", "Dopri5"]

_GAUSS_X, _GAUSS_W = np.polynomial.legendre.leggauss(32)  # exact for poly × exp on any grid here


def _lagrange_integrals(nodes: np.ndarray, a: float, b: float, measure) -> np.ndarray:
    """``∫_a^b L_j(s) m(s) ds`` for the Lagrange basis through ``nodes`` (Gauss–Legendre, float64)."""
    s = 0.5 * (b - a) * _GAUSS_X + 0.5 * (a + b)
    w = 0.5 * (b - a) * _GAUSS_W * measure(s)
    out = np.empty(len(nodes))
    for j, sj in enumerate(nodes):
        basis = np.ones_like(s)
        for k, sk in enumerate(nodes):
            if k != j:
                basis *= (s - sk) / (sj - sk)
        out[j] = np.dot(w, basis)
    return out


@functools.lru_cache(maxsize=256)
def _multistep_weights(order: int, basis: str, rho_nodes: tuple[float, ...]) -> tuple[tuple[float, ...], ...]:
    """``W[i][j]`` on the grid ``rho_nodes``: ε through the last ``order`` nodes, polynomial in
    λ (``basis="lambda"``, DPM-Solver) or in ρ (``"rho"``, Adams–Bashforth), integrated over dρ."""
    rhos = np.array(rho_nodes, dtype=np.float64)
    out = []
    for i in range(len(rhos) - 1):
        k = min(order, i + 1)
        if basis == "lambda":
            k = _clean_end_order(k, i, rhos)
        if k == 1:
            out.append((float(rhos[i + 1] - rhos[i]),))  # Euler in ρ: exactly DDIM
            continue
        if basis == "lambda":
            # dρ = −e^{−λ} dλ; shift λ by λ_i so the exponential stays O(1).
            lam = -np.log(rhos[i - k + 1:i + 1][::-1])
            shift = lam[0]
            w = _lagrange_integrals(lam - shift, 0.0, -np.log(rhos[i + 1]) - shift,
                                    lambda s: -np.exp(-s))
            out.append(tuple(float(x) for x in w * math.exp(-shift)))
        else:
            nodes_rho = rhos[i - k + 1:i + 1][::-1]
            out.append(tuple(float(x) for x in _lagrange_integrals(
                nodes_rho, rhos[i], rhos[i + 1], lambda s: np.ones_like(s))))
    return tuple(out)


def _clean_end_order(k: int, i: int, rhos) -> int:
    """λ = −log ρ is infinite at the clean end of a flow path (ρ = 0, σ = 0), which a monotone
    grid has only at an end: a step into or out of it is first order (as DPM-Solver's lower-order
    final step), and later steps interpolate past it."""
    if 0.0 in (rhos[0], rhos[i], rhos[i + 1]):
        return 1 if 0.0 in (rhos[i], rhos[i + 1]) else min(k, i)
    return k


@functools.lru_cache(maxsize=256)
def _data_weights(order: int, rho_nodes: tuple[float, ...]):
    """``(W[i], A[i])`` of the data form on the grid ``rho_nodes``.

    With z = y/ρ = x/σ, dz/dλ = e^λ x̂_0 (DPM-Solver++, Lu et al. 2022, eq. 9), so
    ``y_{i+1} = (ρ_{i+1}/ρ_i) y_i + Σ_j C_ij x̂_{0,i−j}`` with ``C_ij = ρ_{i+1} ∫ e^λ L_j(λ) dλ`` over
    [λ_i, λ_{i+1}] = ``∫ e^s L_j`` over [λ_i − λ_{i+1}, 0] (O(1) on any grid). Substituting
    x̂_0 = y − ρε gives ``A_i0 = ρ_{i+1}/ρ_i − 1 + C_i0``, ``A_ij = C_ij``, ``W_ij = −ρ_{i−j} C_ij``.
    At first order this is exactly DDIM (A = 0, W = ρ_{i+1} − ρ_i), which also takes the steps
    into and out of ρ = 0.
    """
    rhos = np.array(rho_nodes, dtype=np.float64)
    out = []
    for i in range(len(rhos) - 1):
        k = _clean_end_order(min(order, i + 1), i, rhos)
        if k == 1:
            out.append(((float(rhos[i + 1] - rhos[i]),), (0.0,)))
            continue
        lam = -np.log(rhos[i - k + 1:i + 1][::-1])  # λ_i, λ_{i−1}, …
        end = -np.log(rhos[i + 1])
        c = _lagrange_integrals(lam - end, lam[0] - end, 0.0, np.exp)
        a = [float(x) for x in c]
        a[0] += float(rhos[i + 1] / rhos[i]) - 1.0
        w = [float(-r * x) for r, x in zip(rhos[i - k + 1:i + 1][::-1], c)]
        out.append((tuple(w), tuple(a)))
    return tuple(out)


def _combine(w, eps, a, ys):
    """One multistep update ``Σ_j w_j ε_j (+ Σ_j a_j y_j)``, forward or reversed (``a``: the data
    form's y-weights of this step, or None)."""
    step = sum(wj * e for wj, e in zip(w, eps))
    if a is not None:
        step = step + sum(aj * y for aj, y in zip(a, ys) if aj != 0.0)
    return step


def _evaluate(tape, step: int, fn, y, cond, uncond):
    """``fn(y, cond, uncond)``, through ``tape`` (``auto``: it may keep the graph) when given."""
    return fn(y, cond, uncond) if tape is None else tape(step, fn, y)


class _Rater:
    """Rates each forward state ``y_i`` for :class:`RankedAnchors` by the relative error of the
    reversed step that the adjoint's backward re-solve takes onto it from the exact ``y_{i+1}``
    (docs/design.md §2.4.1), as soon as the ε values that step uses exist: no extra network call.
    Holds only the states still to be rated and the few ε and y ahead of them."""

    def __init__(self, solver: "LinearMultistep", nodes, anchors: RankedAnchors):
        self.n = len(nodes) - 1
        self.rev_weights, self.rev_y_weights = solver.weights(nodes[::-1]), solver.y_weights(nodes[::-1])
        self.anchors = anchors
        self.ys: dict[int, torch.Tensor] = {}
        self.eps: dict[int, torch.Tensor] = {}
        self.pending: list[int] = []

    def _last_used(self, i: int) -> int:
        m = self.n - 1 - i
        k = len(self.rev_weights[m])
        if self.rev_y_weights is not None:
            k = max(k, len(self.rev_y_weights[m]))
        return i + k

    def add(self, j: int, y: torch.Tensor, eps: torch.Tensor) -> None:
        """``y_j`` and ``ε̃(y_j)`` of the forward pass (j = N: the end state)."""
        y, eps = y.detach(), eps.detach()
        self.ys[j], self.eps[j] = y, eps
        if j < self.n:
            self.pending.append(j)
        for i in [i for i in self.pending if self._last_used(i) <= j]:
            self._rate(i)
            self.pending.remove(i)
        oldest = min(self.pending, default=j + 1)
        for k in [k for k in self.ys if k < oldest]:
            del self.ys[k], self.eps[k]

    def _rate(self, i: int) -> None:
        m = self.n - 1 - i
        ahead = range(i + 1, self._last_used(i) + 1)  # y_{i+1}, …: the reversed step's history
        y_hat = self.ys[i + 1] + _combine(self.rev_weights[m], [self.eps[k] for k in ahead],
                                          None if self.rev_y_weights is None else self.rev_y_weights[m],
                                          [self.ys[k] for k in ahead])
        y_i = self.ys[i]
        error = float((y_hat - y_i).norm() / y_i.norm().clamp_min(torch.finfo(y_i.dtype).tiny))
        self.anchors.offer(i, y_i, error)


class LinearMultistep:
    """``y_{i+1} = y_i + Σ_j W_ij ε_{i−j} (+ Σ_j A_ij y_{i−j})``: ε (or, in the data form, x̂_0)
    interpolated through the last K nodes in ``basis``."""

    kind = "multistep"
    ranks_anchors = True  # the adjoint's anchors are rated without extra network calls (_Rater)

    def __init__(self, name: str, order: int, basis: str, form: str = "noise"):
        self.name, self.order, self.basis, self.form = name, order, basis, form

    def weights(self, nodes: list[Node]) -> tuple[tuple[float, ...], ...]:
        """``W[i][j]``: the weight of ``ε_{i−j}`` in step i (float64 Python floats).

        Cached per grid: forward and backward (and every request on the same grid) share it.
        """
        rhos = tuple(n.rho for n in nodes)
        if self.form == "data":
            return tuple(w for w, _ in _data_weights(self.order, rhos))
        return _multistep_weights(self.order, self.basis, rhos)

    def y_weights(self, nodes: list[Node]) -> tuple[tuple[float, ...], ...] | None:
        """``A[i][j]``: the weight of ``y_{i−j}`` in step i, or None when there are none."""
        if self.form != "data":
            return None
        return tuple(a for _, a in _data_weights(self.order, tuple(n.rho for n in nodes)))

    def solve(self, field: GuidedEps, y: torch.Tensor, nodes, cond, uncond, *, store=frozenset(),
              callback=None, tape=None, anchors=None):
        """Forward solve; returns ``(y_N, {i: y_i for i in store} or None)``; ``tape``
        (``auto``) runs the network calls and keeps the graphs it plans to; ``anchors``
        (``adjoint`` under a budget, a :class:`RankedAnchors`) takes the states instead of
        ``store`` and chooses which to keep, and the returned dict is its choice."""
        weights, y_weights = self.weights(nodes), self.y_weights(nodes)
        history: list[torch.Tensor] = []
        states: list[torch.Tensor] = []
        stored = {} if store else None
        rater = _Rater(self, nodes, anchors) if anchors is not None else None
        for i, w in enumerate(weights):
            if i in store:
                stored[i] = y
            history.insert(0, _evaluate(tape, i, lambda y_, c, u, node=nodes[i]: field(y_, node, c, u),
                                        y, cond, uncond))
            if rater is not None:
                rater.add(i, y, history[0])
            del history[self.order:]
            if y_weights is not None:
                states.insert(0, y)
                del states[self.order:]
            y = y + _combine(w, history, None if y_weights is None else y_weights[i], states)
            if rater is not None and i == len(weights) - 1:  # before the last callback: a forward call
                with torch.no_grad():
                    anchors.eps_end = field(y, nodes[-1], cond, uncond)
                rater.add(len(weights), y, anchors.eps_end)
                stored = anchors.states
            if callback is not None:
                callback("forward", i + 1, len(weights), nodes[i + 1].t)
        return y, stored

    def backward(self, field: GuidedEps, vjp, nodes, y_end, ybar, stored=None, callback=None,
                 eps_end=None, first: int = 0):
        """``∂L/∂y_0`` from ``∂L/∂y_N`` through the discrete update; θ-terms accumulate in ``vjp``.
        ``first > 0`` (a truncated gradient): the steps before it are constants — their network
        calls get no cotangent, ``y_first`` none beyond — and ``∂L/∂y_0`` is zero.

        With every state stored this is the exact gradient (``checkpoint``, ``auto``); a missing
        ``y_i`` is re-solved backward by the same method on the reversed grid (``adjoint``) from
        the nearest stored state above it (an anchor, or ``y_N``), reusing the network call of the
        VJP at ``y_{i+1}`` as the backward solver's evaluation; ``eps_end`` is ``ε̃(y_N)`` when the
        forward pass already has it.
        """
        weights, y_weights = self.weights(nodes), self.y_weights(nodes)
        n = len(weights)
        stored = stored or {}
        ybars = [ybar]  # ȳ_{i+1}, ȳ_{i+2}, …
        resolve = len(stored) < n
        if resolve:
            rev_weights, rev_y_weights = self.weights(nodes[::-1]), self.y_weights(nodes[::-1])
            if eps_end is None:  # not already evaluated by a ranking forward pass
                with torch.no_grad():
                    eps_end = field(y_end, nodes[-1], vjp.cond, vjp.uncond)
            rev_eps = [eps_end]
            y_hat = y_end
            rev_y = [y_end]
        for i in reversed(range(first, n)):
            if i in stored:
                y_i = y_hat = stored[i]
            else:
                y_hat = y_hat + _combine(rev_weights[n - 1 - i], rev_eps,
                                         None if rev_y_weights is None else rev_y_weights[n - 1 - i], rev_y)
                y_i = y_hat
            # ε̄_i = Σ_m W[m][m−i] ȳ_{m+1} over the steps m ≥ i whose update used ε_i; the data
            # form's y-terms add Σ_m A[m][m−i] ȳ_{m+1} to ȳ_i directly.
            ebar = sum(weights[i + k][k] * ybars[k] for k in range(len(ybars))
                       if k < len(weights[i + k]))
            eps_i, grad_y = vjp.field(field, y_i, nodes[i], ebar, step=i)
            direct = ybars[0] + grad_y
            if y_weights is not None:
                direct = direct + sum(y_weights[i + k][k] * ybars[k] for k in range(len(ybars))
                                      if k < len(y_weights[i + k]) and y_weights[i + k][k] != 0.0)
            ybars.insert(0, direct)
            del ybars[self.order:]
            if resolve:
                rev_eps.insert(0, eps_i)
                del rev_eps[self.order:]
                rev_y.insert(0, y_i)
                del rev_y[self.order:]
            if callback is not None:
                callback("backward", n - i, n - first, nodes[i].t)
        return ybars[0] if first == 0 else torch.zeros_like(ybars[0])


class OneStep:
    """One-step methods: ``y_{i+1} = Φ(y_i; ρ_i → ρ_{i+1})``; the VJP recomputes one step."""

    kind = "onestep"
    name = "onestep"
    ranks_anchors = False  # rating a state would cost the reversed step's calls: anchors are even

    def step(self, field: GuidedEps, y, a: Node, b: Node, cond, uncond):
        raise NotImplementedError

    def solve(self, field, y, nodes, cond, uncond, *, store=frozenset(), callback=None, tape=None,
              anchors=None):
        if anchors is not None:
            raise ValueError(f"{self.name} keeps evenly spaced anchors (store), not ranked ones")
        stored = {} if store else None
        n = len(nodes) - 1
        for i in range(n):
            if i in store:
                stored[i] = y
            y = _evaluate(tape, i, lambda y_, c, u, a=nodes[i], b=nodes[i + 1]: self.step(field, y_, a, b, c, u),
                          y, cond, uncond)
            if callback is not None:
                callback("forward", i + 1, n, nodes[i + 1].t)
        return y, stored

    def backward(self, field, vjp, nodes, y_end, ybar, stored=None, callback=None, eps_end=None,
                 first: int = 0):
        """As :meth:`LinearMultistep.backward`; ``adjoint`` re-solves each step by ``Φ`` reversed
        (``eps_end`` is unused: a reversed step evaluates the field itself)."""
        n = len(nodes) - 1
        stored = stored or {}
        y_hat = y_end
        for i in reversed(range(first, n)):
            if i in stored:
                y_i = y_hat = stored[i]
            else:
                with torch.no_grad():
                    y_hat = self.step(field, y_hat, nodes[i + 1], nodes[i], vjp.cond, vjp.uncond)
                y_i = y_hat
            _, ybar = vjp(lambda y, c, u: self.step(field, y, nodes[i], nodes[i + 1], c, u), y_i, ybar,
                          step=i)
            if callback is not None:
                callback("backward", n - i, n - first, nodes[i].t)
        return ybar if first == 0 else torch.zeros_like(ybar)


class Heun(OneStep):
    """Explicit trapezoid (Heun / Karras et al. 2022 Alg. 1 without churn) in ρ: 2 NFE a step."""

    name, order = "heun", 2

    def step(self, field, y, a, b, cond, uncond):
        h = b.rho - a.rho
        e_a = field(y, a, cond, uncond)
        e_b = field(y + h * e_a, b, cond, uncond)
        return y + 0.5 * h * (e_a + e_b)


class Dopri5(OneStep):
    """Adaptive Dormand–Prince 5(4) via torchdiffeq, restarted at every grid node."""

    name, order = "dopri5", 5

    def __init__(self, schedule: Schedule, rtol: float = 1e-5, atol: float = 1e-5):
        self.schedule, self.rtol, self.atol = schedule, rtol, atol

    def step(self, field, y, a, b, cond, uncond):
        from torchdiffeq import odeint

        def rhs(rho, state):
            return field(state, node_at_rho(self.schedule, float(rho.detach())), cond, uncond)

        span = torch.tensor([a.rho, b.rho], dtype=y.dtype, device=y.device)
        # A fixed first step: torchdiffeq's automatic one depends on y, which would leak a
        # step-size term into the gradient (later ones are chosen under no_grad); step_t makes
        # the last step land on ρ_b instead of stepping past it and interpolating back.
        options = dict(first_step=abs(b.rho - a.rho) / 16.0, step_t=span[1:])
        return odeint(rhs, y, span, method="dopri5", rtol=self.rtol, atol=self.atol,
                      options=options)[-1]


_REGISTRY = {
    "euler": lambda schedule, **tol: LinearMultistep("euler", 1, "rho"),
    "dpm2": lambda schedule, **tol: LinearMultistep("dpm2", 2, "lambda"),
    "dpm3": lambda schedule, **tol: LinearMultistep("dpm3", 3, "lambda"),
    "dpmpp2": lambda schedule, **tol: LinearMultistep("dpmpp2", 2, "lambda", form="data"),
    "dpmpp3": lambda schedule, **tol: LinearMultistep("dpmpp3", 3, "lambda", form="data"),
    "ab2": lambda schedule, **tol: LinearMultistep("ab2", 2, "rho"),
    "ab3": lambda schedule, **tol: LinearMultistep("ab3", 3, "rho"),
    "ab4": lambda schedule, **tol: LinearMultistep("ab4", 4, "rho"),
    "heun": lambda schedule, **tol: Heun(),
    "dopri5": lambda schedule, **tol: Dopri5(schedule, **tol),
}
SOLVERS = tuple(_REGISTRY)
_ALIASES = {"ddim": "euler", "dpm1": "euler"}


def get_solver(name: str, schedule: Schedule, *, rtol: float = 1e-5, atol: float = 1e-5):
    """The solver registered under ``name`` (``ddim`` and ``dpm1`` are aliases of ``euler``)."""
    factory = _REGISTRY.get(_ALIASES.get(name, name))
    if factory is None:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    return factory(schedule, rtol=rtol, atol=atol)
