"""The ``auto``, ``checkpoint`` and ``adjoint`` gradient modes as one ``torch.autograd.Function``.

Forward runs the solver without a graph (``auto``: keeping the graphs of the last steps that fit
the memory budget, core/_memory.py). Backward walks the grid in reverse, one network call with
grad per step (none for a kept step), and applies the solver's own update VJP: on stored states
``y_i`` (``checkpoint`` and ``auto``, the exact gradient of the discrete sampler) or on states
re-solved backward from the nearest stored anchor (``adjoint``, the paper's eq. 11 done as its
discrete recursion). The conditioning and weight terms ``a_θ`` of eq. 11 accumulate in :class:`VJP`.
"""

from __future__ import annotations

import torch

from contextlib import nullcontext

from ._blocks import checkpointed_blocks
from ._field import HALF_DTYPES
from ._memory import MemoryPlan, Tape

__all__ = ["VJP", "SolveFunction"]


def _leaf(c, needs_grad: bool):
    """A detached copy of a conditioning input to differentiate against (non-tensors pass)."""
    return c.detach().requires_grad_(needs_grad) if isinstance(c, torch.Tensor) else c


class VJP:
    """One vector–Jacobian product at a time, accumulating the gradients of cond, uncond, params."""

    def __init__(self, cond, uncond, params, needs_cond: bool, needs_uncond: bool):
        self.cond = _leaf(cond, needs_cond)
        self.uncond = _leaf(uncond, needs_uncond)
        self.targets = ([self.cond] if needs_cond else []) + ([self.uncond] if needs_uncond else [])
        self.needs_cond, self.needs_uncond = needs_cond, needs_uncond
        self.params = list(params)
        self.targets += self.params
        self.grads: list[torch.Tensor | None] = [None] * len(self.targets)
        self.tape = None  # ``auto``: the Tape whose kept graphs backward takes back step by step

    def _accumulate(self, k: int, g) -> None:
        """Sum one step's θ-gradient; half-precision terms are summed in float32 (autograd casts
        the total back to the target's dtype)."""
        if g is not None:
            if g.dtype in HALF_DTYPES:
                g = g.float()
            self.grads[k] = g if self.grads[k] is None else self.grads[k] + g

    def field(self, field, y: torch.Tensor, node, cotangent: torch.Tensor, step: int | None = None):
        """``(ε̃(y), cotangentᵀ ∂ε̃/∂y)`` of one network call at ``node``: from the graph the
        forward pass kept for ``step`` (``auto``), through the network's own VJP when it declares
        one and no weight gradient is wanted, else through autograd."""
        kept = self._kept(step)
        if kept is not None:
            return self._backprop(*kept, cotangent)
        if not field.has_network_vjp or (self.params and not field.network_splits_weights):
            return self(lambda y_, c, u: field(y_, node, c, u), y, cotangent)
        eps, grad_y, c_bar, u_bar, w_bars = field.vjp(y.detach(), node, self.cond, self.uncond,
                                                      cotangent, self.needs_cond, self.needs_uncond,
                                                      tuple(self.params))
        k = 0
        if self.needs_cond:
            self._accumulate(k, c_bar)
            k += 1
        if self.needs_uncond:
            self._accumulate(k, u_bar)
            k += 1
        for j, g in enumerate(w_bars):
            self._accumulate(k + j, g)
        return eps.detach(), grad_y

    def __call__(self, fn, y: torch.Tensor, cotangent: torch.Tensor, step: int | None = None):
        """``(fn(y), cotangentᵀ ∂fn/∂y)``; the θ-parts are added to ``self.grads``."""
        kept = self._kept(step)
        if kept is not None:
            return self._backprop(*kept, cotangent)
        with torch.enable_grad():
            y_leaf = y.detach().requires_grad_(True)
            out = fn(y_leaf, self.cond, self.uncond)
        return self._backprop(y_leaf, out, cotangent)

    def _kept(self, step):
        return None if self.tape is None or step is None else self.tape.take(step)

    def _backprop(self, y_leaf: torch.Tensor, out: torch.Tensor, cotangent: torch.Tensor):
        """``cotangentᵀ ∂out/∂(y, θ)`` through the graph of one call (freed afterwards)."""
        with torch.enable_grad():
            grads = torch.autograd.grad(out, [y_leaf] + self.targets, cotangent, allow_unused=True)
        for k, g in enumerate(grads[1:]):
            self._accumulate(k, g)
        grad_y = grads[0] if grads[0] is not None else torch.zeros_like(y_leaf)
        return out.detach(), grad_y


class SolveFunction(torch.autograd.Function):
    """``y_N = solve(y_0; cond, uncond, θ)`` with a memory-light backward (docs/design.md §2)."""

    @staticmethod
    def forward(ctx, solve, y0, cond, uncond, *params):
        tape = None
        if solve.mode == "auto":
            # The kept graphs must start from the leaves the backward pass differentiates against.
            needs = ctx.needs_input_grad
            ctx.vjp = VJP(cond, uncond, params, needs_cond=needs[2], needs_uncond=needs[3])
            tape = ctx.vjp.tape = Tape(ctx.vjp, len(solve.nodes) - 1, solve.memory_budget,
                                       exclude=solve.network_tensors(), limit=solve.truncate,
                                       checkpoints_blocks=solve.field.checkpoints_blocks,
                                       report=solve.report)
        store, ranked = solve.storage()
        if tape is None and solve.report is not None:
            solve.report(MemoryPlan(solve.mode, len(solve.nodes) - 1, solve.truncate,
                                    stored_states=ranked.capacity if ranked is not None else len(store),
                                    budget_bytes=int(solve.memory_budget)))
        y_end, stored = solve.solver.solve(solve.field, y0, solve.nodes, ctx.vjp.cond if tape else cond,
                                           ctx.vjp.uncond if tape else uncond, store=store,
                                           callback=solve.callback, tape=tape, anchors=ranked)
        ctx.solve, ctx.stored = solve, stored
        ctx.eps_end = ranked.eps_end if ranked is not None else None
        ctx.cond, ctx.uncond, ctx.params = cond, uncond, params
        ctx.y_end = y_end
        return y_end.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, ybar):
        solve = ctx.solve
        needs = ctx.needs_input_grad
        vjp = ctx.vjp if solve.mode == "auto" else VJP(ctx.cond, ctx.uncond, ctx.params,
                                                        needs_cond=needs[2], needs_uncond=needs[3])
        # auto's plan may checkpoint inside the network for the recomputed steps (core/_blocks.py)
        blocks = vjp.tape is not None and vjp.tape.blocks
        with checkpointed_blocks() if blocks else nullcontext():
            y0bar = solve.solver.backward(solve.field, vjp, solve.nodes, ctx.y_end, ybar,
                                          stored=ctx.stored, callback=solve.callback,
                                          eps_end=ctx.eps_end, first=solve.first)
        grads = iter(vjp.grads)
        cond_bar = next(grads) if needs[2] else None
        uncond_bar = next(grads) if needs[3] else None
        # ctx (and the states it holds) is freed with the graph; clearing it here would make a
        # second backward (retain_graph=True) silently fall back to the re-solved trajectory.
        return (None, y0bar if needs[1] else None, cond_bar, uncond_bar, *grads)
