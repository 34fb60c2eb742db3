"""The ``checkpoint`` and ``adjoint`` gradient modes as one ``torch.autograd.Function``.

Forward runs the solver without a graph. Backward walks the grid in reverse, one network call with
grad per step, and applies the solver's own update VJP: on stored states ``y_i`` (``checkpoint``,
the exact gradient of the discrete sampler) or on states re-solved backward from ``y_N`` keeping
only the current ones (``adjoint``, the paper's eq. 11 done as its discrete recursion). The
conditioning and weight terms ``a_θ`` of eq. 11 accumulate in :class:`VJP`.
"""

from __future__ import annotations

import torch

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

    def _accumulate(self, k: int, g) -> None:
        if g is not None:
            self.grads[k] = g if self.grads[k] is None else self.grads[k] + g

    def field(self, field, y: torch.Tensor, node, cotangent: torch.Tensor):
        """``(ε̃(y), cotangentᵀ ∂ε̃/∂y)`` of one network call at ``node``: through the network's
        own VJP when it declares one and no weight gradient is wanted, else through autograd."""
        if self.params or not field.has_network_vjp:
            return self(lambda y_, c, u: field(y_, node, c, u), y, cotangent)
        eps, grad_y, c_bar, u_bar = field.vjp(y.detach(), node, self.cond, self.uncond, cotangent,
                                              self.needs_cond, self.needs_uncond)
        k = 0
        if self.needs_cond:
            self._accumulate(k, c_bar)
            k += 1
        if self.needs_uncond:
            self._accumulate(k, u_bar)
        return eps.detach(), grad_y

    def __call__(self, fn, y: torch.Tensor, cotangent: torch.Tensor):
        """``(fn(y), cotangentᵀ ∂fn/∂y)``; the θ-parts are added to ``self.grads``."""
        with torch.enable_grad():
            y_leaf = y.detach().requires_grad_(True)
            out = fn(y_leaf, self.cond, self.uncond)
            grads = torch.autograd.grad(out, [y_leaf] + self.targets, cotangent, allow_unused=True)
        for k, g in enumerate(grads[1:]):
            self._accumulate(k, g)
        grad_y = grads[0] if grads[0] is not None else torch.zeros_like(y)
        return out.detach(), grad_y


class SolveFunction(torch.autograd.Function):
    """``y_N = solve(y_0; cond, uncond, θ)`` with a memory-light backward (docs/design.md §2)."""

    @staticmethod
    def forward(ctx, engine, y0, cond, uncond, *params):
        y_end, stored = engine.solver.solve(engine.field, y0, engine.nodes, cond, uncond,
                                            store=engine.mode == "checkpoint",
                                            callback=engine.callback)
        ctx.engine, ctx.stored = engine, stored
        ctx.cond, ctx.uncond, ctx.params = cond, uncond, params
        ctx.y_end = y_end
        return y_end.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, ybar):
        engine = ctx.engine
        needs = ctx.needs_input_grad
        vjp = VJP(ctx.cond, ctx.uncond, ctx.params, needs_cond=needs[2], needs_uncond=needs[3])
        y0bar = engine.solver.backward(engine.field, vjp, engine.nodes, ctx.y_end, ybar,
                                       stored=ctx.stored, callback=engine.callback)
        grads = iter(vjp.grads)
        cond_bar = next(grads) if needs[2] else None
        uncond_bar = next(grads) if needs[3] else None
        # ctx (and the states it holds) is freed with the graph; clearing it here would make a
        # second backward (retain_graph=True) silently fall back to the re-solved trajectory.
        return (None, y0bar if needs[1] else None, cond_bar, uncond_bar, *grads)
