"""The VAE decoder in an image-domain gradient, planned (docs/design.md §2.4.4).

Every loss on the decoded image runs the decoder's VJP once, and at 512² one image's decoder
graph is several times one UNet step's. So a latent backend decodes through ``SlicedDecode``, one
autograd.Function: its forward keeps no graph, and its backward recomputes the decoder
``slice_size`` samples at a time, each slice's VJP done before the next one's forward (peak
independent of the batch). When even one sample's graph does not fit, the slices also checkpoint
inside the decoder: each ResNet, attention and upsampler block saves only its input and its
activations exist while its own backward runs. Exact: the decoder treats each sample on its own
(group norm within a sample), so slices give the whole batch's gradient.

``measure`` counts one sample's decoder graph once per latent shape, without keeping it; the
plan (``plan_decode``) is the cheapest that fits the budget: the whole graph kept, slices, the
whole batch checkpointed inside, checkpointed slices — or ``None``: nothing exact fits, and the
request is refused before any work.
"""

from __future__ import annotations

import contextvars
import threading
import weakref
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.checkpoint import checkpoint

from ..core._memory import ALLOCATOR_SLACK  # the planners' one slack: fragmentation, rounding

__all__ = ["DecodePlan", "DecoderGraph", "SlicedDecode", "gate_decoder", "measure", "plan_decode",
           "checkpointed_decoder", "PLAIN", "ALLOCATOR_SLACK"]

_CHECKPOINTED = contextvars.ContextVar("adjointdpm_decoder_checkpointed", default=False)
GATED = ("ResnetBlock2D", "Attention", "Upsample2D")  # diffusers' decoder blocks, by class name


@dataclass(frozen=True)
class DecodePlan:
    """How the decoder runs in a gradient: ``slice_size`` samples per pass (0: the whole batch in
    one pass with its graph kept, no recomputation of the whole), ``checkpointed`` inside each
    pass, and the ``graph_bytes`` one sample's pass holds so planned (0: not measured)."""

    slice_size: int = 0
    checkpointed: bool = False
    graph_bytes: int = 0

    def held(self, batch: int) -> int:
        """The bytes a pass of ``batch`` samples holds at most, as planned (with the slack)."""
        return int(self.graph_bytes * (self.slice_size or batch) * ALLOCATOR_SLACK)


PLAIN = DecodePlan()


@dataclass(frozen=True)
class DecoderGraph:
    """One sample's decoder graph in bytes: ``plain`` (every activation it saves) and, with its
    blocks checkpointed, what stays saved ``outside`` them, their ``inputs`` (what each
    checkpoint keeps) and the ``largest_block``'s own graph (alive while its backward runs)."""

    plain: int
    outside: int = 0
    inputs: int = 0
    largest_block: int = 0

    @property
    def checkpointed(self) -> int:
        return min(self.outside + self.inputs + self.largest_block, self.plain)


def gate_decoder(decoder: torch.nn.Module) -> int:
    """Route each ResNet, attention and upsampler block of ``decoder`` through a checkpoint that
    is off until a ``SlicedDecode`` backward turns it on in its own context (a resident decoder
    shared by many jobs is never switched for all of them). Returns how many blocks."""
    count = 0
    for module in decoder.modules():
        if type(module).__name__ in GATED:
            module.forward = _gated(module.forward)
            count += 1
    return count


@contextmanager
def checkpointed_decoder(on: bool = True):
    """Decoder blocks run in this block (on this thread, in this context) are checkpointed."""
    token = _CHECKPOINTED.set(bool(on))
    try:
        yield
    finally:
        _CHECKPOINTED.reset(token)


def _gated(plain):
    def forward(*args, **kwargs):
        if _CHECKPOINTED.get():
            return checkpoint(plain, *args, use_reentrant=False, **kwargs)
        return plain(*args, **kwargs)
    return forward


def measure(decode, x: torch.Tensor, decoder: torch.nn.Module) -> DecoderGraph:
    """One sample ``x`` decoded with autograd on, every tensor its graph would save counted (by
    storage, once; the decoder's own weights not) and dropped at once: the graph's size without
    ever holding it. A dropped storage's address may be reused by a later one, which the graph
    would hold as well: a storage is the same one only while it lives (a weak reference). Bytes
    saved inside each gated block are attributed to it, and each block's input counted."""
    owner: list = [None]
    inside: dict = defaultdict(int)
    weights = {p.untyped_storage().data_ptr() for p in decoder.parameters()}
    seen: dict = {}
    total, inputs = [0], [0]

    def pack(t):
        if t.layout != torch.strided:
            return None
        storage = t.untyped_storage()
        key = storage.data_ptr()
        known = seen.get(key)
        if key not in weights and (known is None or known() is not storage):
            seen[key] = weakref.ref(storage)
            total[0] += storage.nbytes()
            if owner[0] is not None:
                inside[owner[0]] += storage.nbytes()
        return None

    def unpack(_):
        raise RuntimeError("a measured decoder graph cannot be backpropagated")

    me = threading.get_ident()  # the resident decoder is shared: other jobs' calls fire the hooks

    def enter(module, args):
        if threading.get_ident() == me:
            owner[0] = id(module)
            inputs[0] += sum(a.nbytes for a in args if isinstance(a, torch.Tensor))

    def leave(module, args, output):
        if threading.get_ident() == me:
            owner[0] = None

    hooks = []
    for module in decoder.modules():
        if type(module).__name__ in GATED:
            hooks += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        with torch.enable_grad(), saved_tensors_hooks(pack, unpack):
            decode(x.detach().requires_grad_())
    finally:
        for h in hooks:
            h.remove()
    return DecoderGraph(plain=total[0], outside=total[0] - sum(inside.values()), inputs=inputs[0],
                        largest_block=max(inside.values(), default=0))


def plan_decode(graph: DecoderGraph, batch: int, budget: float | None) -> DecodePlan | None:
    """The cheapest exact plan for ``batch`` samples within ``budget`` bytes (None: no budget,
    the whole graph), each costing about one decoder forward more than the one before: the whole
    batch's graph kept; else the most samples per recomputed slice that fit; else the whole
    batch checkpointed inside (its blocks recomputed, the whole not); else the most samples per
    recomputed slice checkpointed inside; else None."""
    if budget is None or graph.plain * batch * ALLOCATOR_SLACK <= budget:
        return DecodePlan(0, False, graph.plain)
    per_slice = int(budget // (graph.plain * ALLOCATOR_SLACK))
    if per_slice >= 1:
        return DecodePlan(min(per_slice, batch), False, graph.plain)
    if graph.checkpointed * batch * ALLOCATOR_SLACK <= budget:
        return DecodePlan(0, True, graph.checkpointed)
    per_slice = int(budget // (graph.checkpointed * ALLOCATOR_SLACK))
    if per_slice >= 1:
        return DecodePlan(min(per_slice, batch), True, graph.checkpointed)
    return None


class SlicedDecode(torch.autograd.Function):
    """``decode(x0)`` with no graph in the forward; the backward recomputes it slice by slice
    (``plan.slice_size`` samples), checkpointed inside when ``plan.checkpointed``, and returns
    the VJP w.r.t. ``x0`` (the decoder's weights are frozen)."""

    @staticmethod
    def forward(ctx, x0, decode, plan: DecodePlan):
        ctx.decode, ctx.plan = decode, plan
        ctx.save_for_backward(x0)
        step = plan.slice_size or len(x0)
        return torch.cat([decode(x0[k:k + step]) for k in range(0, len(x0), step)])

    @staticmethod
    def backward(ctx, grad):
        (x0,) = ctx.saved_tensors
        step, parts = ctx.plan.slice_size or len(x0), []
        with checkpointed_decoder(ctx.plan.checkpointed):
            for k in range(0, len(x0), step):
                x = x0[k:k + step].detach().requires_grad_()
                with torch.enable_grad():
                    image = ctx.decode(x)
                parts.append(torch.autograd.grad(image, x, grad[k:k + step])[0])
                del image
        return torch.cat(parts), None, None
