"""``EngineNetwork``: a job's view of a resident network whose calls go through the engine.

An ``nn.Module`` around the network (so ``sample`` still sees, and differentiates, its
parameters) that declares ``core.NetworkVJP``: the backward pass hands each network call over
with its cotangent, and the engine batches it with other jobs' calls. A call that must build a
graph (plain backprop, weight gradients of a network that owns its weights, the VJP of a
one-step solver) runs alone on the engine thread and keeps its graph; its backward then runs in
the job's thread. An adapter's weight gradients go with its VJP calls (``splits_weights``).

Both run in the job's own context on the engine thread: a call made while ``auto``'s plan
checkpoints inside the network (core/_blocks.py) does so there too — a VJP call with
others' that do the same — and a solo call enters the job's call scope there (core/_calls.py:
``auto`` watching its first graph grow); it declares ``BlockCheckpointing`` as its network does.
"""

from __future__ import annotations

import contextvars

import torch
from torch import nn

from ..core import BlockCheckpointing, NetworkVJP, SharedRows, blocks_checkpointed, network_call_scope
from ._work import FORWARD, SOLO, VJP, WorkItem, batch_key

__all__ = ["EngineNetwork"]


class EngineNetwork(nn.Module, NetworkVJP, BlockCheckpointing):
    def __init__(self, engine, module: nn.Module, job, model: str = ""):
        super().__init__()
        self.inner = module  # a submodule: parameters() are the network's own, not copies
        object.__setattr__(self, "_engine", engine)
        object.__setattr__(self, "_job", job)
        self.model = model
        self.trainable = any(p.requires_grad for p in module.parameters())
        # an adapter's weights act on its own rows: their gradients split from a shared call
        self.splits_weights = isinstance(module, SharedRows)
        self.checkpoints_blocks = isinstance(module, BlockCheckpointing) and module.checkpoints_blocks

    def _item(self, kind: str, x, t, cond, **extra) -> WorkItem:
        key = batch_key(kind, self.inner, x, t, cond, extra.get("cond_grad", False),
                        extra.get("blocks", False))
        return WorkItem(kind, key, self._job, self._job.caller, self.model, int(x.shape[0]),
                        module=self.inner, x=x, t=t, cond=cond, **extra)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        needs_graph = torch.is_grad_enabled() and (
            self.trainable or x.requires_grad or (isinstance(cond, torch.Tensor) and cond.requires_grad))
        if needs_graph:
            def call(inner=self.inner):
                with torch.enable_grad(), network_call_scope():
                    return inner(x, t, cond)
            context = contextvars.copy_context()  # the job's: its plan's blocks, its call scope
            item = WorkItem(SOLO, None, self._job, self._job.caller, self.model, int(x.shape[0]),
                            closure=lambda: context.run(call))
            return self._engine.submit(item)
        return self._engine.submit(self._item(FORWARD, x.detach(), t, _detach(cond)))

    def vjp(self, x, t, cond, cotangent, cond_grad: bool, weights: tuple = ()):
        if weights and not self.splits_weights:
            raise ValueError("this network's weight gradients cannot be split from a shared call")
        item = self._item(VJP, x.detach(), t, _detach(cond), cotangent=cotangent.detach(),
                          cond_grad=bool(cond_grad), weights=tuple(weights),
                          blocks=blocks_checkpointed())
        return self._engine.submit(item)


def _detach(value):
    return value.detach() if isinstance(value, torch.Tensor) else value
