"""The VAE decoder in an image-domain gradient, planned (docs/design.md §2.4.4).

Every loss on the decoded image runs the decoder's VJP once, and at 512² one image's decoder
graph is several times one UNet step's. So a latent backend decodes through ``SlicedDecode``, one
autograd.Function: its forward keeps no graph, and its backward recomputes the decoder
``slice_size`` samples at a time, each slice's VJP done before the next one's forward (peak
independent of the batch). When even one sample's graph does not fit, the decoder also
recomputes inside (``Checkpointing``): each ResNet, attention and upsampler block saves only its
input; finer, each ResNet's norm→activation pairs too, and the low-resolution trunk (mid block
and all up blocks but the last) keeps only its input while the full-resolution blocks'
backward runs. Exact: the decoder treats each sample on its own (group norm within a sample),
and a recomputation repeats the same operations.

``measure`` counts one sample's decoder graph once per latent shape, without keeping it, as a
tree of the regions a plan can recompute; the plan (``plan_decode``) is the cheapest that fits
the budget — or ``None``: nothing exact fits, and the request is refused before any work.
"""

from __future__ import annotations

import contextvars
import enum
import itertools
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.autograd.function import once_differentiable
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.checkpoint import checkpoint

from ..core._memory import ALLOCATOR_SLACK  # the planners' one slack: fragmentation, rounding

__all__ = ["Checkpointing", "DecodePlan", "DecoderGraph", "SlicedDecode", "gate_decoder", "measure",
           "plan_decode", "checkpointed_decoder", "PLAIN", "ALLOCATOR_SLACK", "HIGH_RES_UP_BLOCKS"]


class Checkpointing(enum.IntEnum):
    """What a decoder pass recomputes in its backward instead of keeping; each level includes the
    one before and costs about one more forward of what it recomputes."""

    NONE = 0    # every activation kept
    BLOCKS = 1  # each ResNet, attention and upsampler block keeps only its input
    FINE = 2    # also each ResNet's norm→activation pairs and the low-resolution trunk


GATED = ("ResnetBlock2D", "Attention", "Upsample2D")  # diffusers' decoder blocks, by class name
HIGH_RES_UP_BLOCKS = 1  # up blocks outside the FINE trunk: the last, at the image's full size
_REGION_LEVEL = {"block": Checkpointing.BLOCKS, "pair": Checkpointing.FINE, "trunk": Checkpointing.FINE}
_LEVEL = contextvars.ContextVar("adjointdpm_decoder_checkpointing", default=Checkpointing.NONE)
_TRACER = contextvars.ContextVar("adjointdpm_decoder_tracer", default=None)
_NAMES = itertools.count()


@dataclass(frozen=True)
class DecodePlan:
    """How the decoder runs in a gradient: ``slice_size`` samples per pass (0: the whole batch in
    one pass with its graph kept, no recomputation of the whole), ``checkpointing`` inside each
    pass, and the ``graph_bytes`` one sample's pass holds so planned (0: not measured); with a
    ``tile``, each pass is one tile's."""

    slice_size: int = 0
    checkpointing: Checkpointing = Checkpointing.NONE
    graph_bytes: int = 0
    tile: int = 0  # > 0: approximate, by request — tiles of this many latent pixels (_tiling.py)

    def held(self, batch: int) -> int:
        """The bytes a pass of ``batch`` samples holds at most, as planned (with the slack)."""
        return int(self.graph_bytes * (self.slice_size or batch) * ALLOCATOR_SLACK)


PLAIN = DecodePlan()


@dataclass(frozen=True)
class DecoderGraph:
    """One sample's decoder graph in bytes at each ``Checkpointing`` level: ``held`` (the most a
    pass holds: what stays saved, plus the largest recomputed region's own graph while its
    backward runs) and ``kept`` (what stays saved outside the recomputed regions)."""

    held: tuple[int, ...]
    kept: tuple[int, ...] = ()

    @property
    def plain(self) -> int:
        return self.held[Checkpointing.NONE]

    def at(self, level: Checkpointing) -> int:
        return self.held[level]


@contextmanager
def checkpointed_decoder(level: Checkpointing = Checkpointing.BLOCKS):
    """Decoder passes run in this block (on this thread, in this context) recompute at ``level``
    (a resident decoder shared by many jobs is never switched for all of them)."""
    token = _LEVEL.set(Checkpointing(level))
    try:
        yield
    finally:
        _LEVEL.reset(token)


def _region(kind: str, fn, *args, **kwargs):
    """``fn(*args)`` as a region a plan may recompute: checkpointed when the context's level asks
    for its kind, traced when ``measure`` runs, else plain. The checkpoint fixes the level for
    its recomputation, which runs in the backward pass, outside this context."""
    tracer = _TRACER.get()
    if tracer is not None:
        return tracer.region(kind, fn, args, kwargs)
    level = _LEVEL.get()
    if level >= _REGION_LEVEL[kind]:
        return checkpoint(_at_level, level, fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)


def _at_level(level, fn, *args, **kwargs):
    token = _LEVEL.set(level)
    try:
        return fn(*args, **kwargs)
    finally:
        _LEVEL.reset(token)


def _norm_act(norm, act, x):
    return act(norm(x))


def _fine_resnet(block, x):
    """diffusers' ``ResnetBlock2D.forward`` without a time embedding or resampling, its
    norm→activation pairs as regions (the pair keeps only the norm's input; the activation's
    input, the norm's output, is recomputed)."""
    h = block.conv1(_region("pair", _norm_act, block.norm1, block.nonlinearity, x))
    h = _region("pair", _norm_act, block.norm2, block.nonlinearity, h)
    h = block.conv2(block.dropout(h))
    shortcut = block.conv_shortcut(x) if block.conv_shortcut is not None else x
    return (shortcut + h) / block.output_scale_factor


def _trunk(decoder, count: int, sample):
    sample = decoder.mid_block(sample, None)
    for up_block in decoder.up_blocks[:count]:
        sample = up_block(sample, None)
    return sample


def _fine_decoder(decoder, sample):
    """diffusers' ``Decoder.forward`` without latent embeddings, its low-resolution trunk one
    region (FINE keeps only the trunk's input while the last up block's backward runs, then
    recomputes the trunk with its own blocks checkpointed). At 512² the last up block's
    activations (128-256 channels at full size) and their gradients are the peak; a trunk one up
    block shorter keeps the block inputs beside them too (docs/design.md §2.4.4)."""
    sample = decoder.conv_in(sample)
    count = max(0, len(decoder.up_blocks) - HIGH_RES_UP_BLOCKS)
    sample = _region("trunk", _trunk, decoder, count, sample)
    for up_block in decoder.up_blocks[count:]:
        sample = up_block(sample, None)
    sample = _region("pair", _norm_act, decoder.conv_norm_out, decoder.conv_act, sample)
    return decoder.conv_out(sample)


def gate_decoder(decoder: torch.nn.Module) -> int:
    """Route ``decoder``'s regions (each ResNet, attention and upsampler block; with FINE, each
    ResNet's norm→activation pairs and the trunk) through ``_region``: plain until a plan's
    level asks. Blocks of another shape (a time embedding, resampling inside a ResNet, a decoder
    with latent embeddings) stay whole blocks at FINE. Returns how many blocks."""
    count = 0
    for module in decoder.modules():
        name = type(module).__name__
        if name == "ResnetBlock2D":
            module.forward = _gated_resnet(module, module.forward)
        elif name in GATED:
            module.forward = _gated_block(module.forward)
        else:
            continue
        count += 1
    if type(decoder).__name__ == "Decoder":
        decoder.forward = _gated_decoder(decoder, decoder.forward)
    return count


def _gated_block(plain):
    def forward(*args, **kwargs):
        return _region("block", plain, *args, **kwargs)
    return forward


def _gated_resnet(block, plain):
    fine = (block.upsample is None and block.downsample is None and block.time_emb_proj is None
            and block.time_embedding_norm == "default")

    def forward(input_tensor, temb=None, *args, **kwargs):
        if fine and temb is None and not args and not kwargs and _LEVEL.get() >= Checkpointing.FINE:
            return _region("block", _fine_resnet, block, input_tensor)
        return _region("block", plain, input_tensor, temb, *args, **kwargs)
    return forward


def _gated_decoder(decoder, plain):
    def forward(sample, latent_embeds=None):
        if latent_embeds is None and _LEVEL.get() >= Checkpointing.FINE:
            return _fine_decoder(decoder, sample)
        return plain(sample, latent_embeds)
    return forward


@dataclass
class _Region:
    kind: str
    inputs: dict = field(default_factory=dict)  # storage → bytes: what its checkpoint keeps
    own: dict = field(default_factory=dict)     # storage → bytes saved inside it, not in a child
    children: list = field(default_factory=list)

    def checkpointed(self, level) -> bool:
        return self.kind != "root" and level >= _REGION_LEVEL[self.kind]

    def kept(self, level) -> dict:
        """What stays saved for this region once its forward is done (its inputs, if recomputed)."""
        if self.checkpointed(level):
            return self.inputs
        out = dict(self.own)
        for child in self.children:
            out.update(child.kept(level))
        return out

    def peak(self, level) -> int:
        """While this (recomputed, or the root) region's backward runs: what it and its children
        keep (less its own inputs, held where it is kept) and the largest recomputed region within."""
        saved = dict(self.own)
        for child in self.children:
            saved.update(child.kept(level))
        for key in self.inputs:
            saved.pop(key, None)
        return sum(saved.values()) + self.inner(level)

    def inner(self, level) -> int:
        return max((c.peak(level) if c.checkpointed(level) else c.inner(level) for c in self.children),
                   default=0)


class _Tracer:
    """Counts each storage the graph would save once, into the innermost region running, the
    decoder's weights not; keeps nothing. Storages are named while they live (a weak reference):
    a dropped one's address is reused by the next, which the graph would hold as well."""

    def __init__(self, weights: set):
        self.weights, self.names = weights, {}
        self.stack = [_Region("root")]

    def name(self, storage) -> int:
        key = storage.data_ptr()
        known = self.names.get(key)
        if known is None or known[0]() is not storage:
            known = self.names[key] = (weakref.ref(storage), next(_NAMES))
        return known[1]

    def pack(self, t):
        if t.layout == torch.strided and t.untyped_storage().data_ptr() not in self.weights:
            storage = t.untyped_storage()
            self.stack[-1].own[self.name(storage)] = storage.nbytes()  # once in each region
        return None

    @staticmethod
    def unpack(_):
        raise RuntimeError("a measured decoder graph cannot be backpropagated")

    def region(self, kind, fn, args, kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        region = _Region(kind, inputs={self.name(t.untyped_storage()): t.nbytes for t in tensors})
        self.stack[-1].children.append(region)
        self.stack.append(region)
        try:
            return fn(*args, **kwargs)
        finally:
            self.stack.pop()


def measure(decode, x: torch.Tensor, decoder: torch.nn.Module) -> DecoderGraph:
    """One sample ``x`` decoded with autograd on, in FINE's structure, every tensor its graph
    would save counted and dropped at once: the graph's size at each level without ever holding
    it. The tracer is this context's alone (saved-tensor hooks are per thread): another job's
    decode through the shared decoder meanwhile is neither traced nor counted."""
    tracer = _Tracer({p.untyped_storage().data_ptr() for p in decoder.parameters()})
    token = _TRACER.set(tracer)
    try:
        with checkpointed_decoder(Checkpointing.FINE), torch.enable_grad(), \
                saved_tensors_hooks(tracer.pack, tracer.unpack):
            decode(x.detach().requires_grad_())
    finally:
        _TRACER.reset(token)
    root = tracer.stack[0]
    return DecoderGraph(held=tuple(root.peak(level) for level in Checkpointing),
                        kept=tuple(sum(root.kept(level).values()) for level in Checkpointing))


def plan_decode(graph: DecoderGraph, batch: int, budget: float | None) -> DecodePlan | None:
    """The cheapest exact plan for ``batch`` samples within ``budget`` bytes (None: no budget,
    the whole graph), each costing more recomputation than the one before: at each level from
    NONE to FINE, the whole batch's pass, else the most samples per recomputed slice that fit;
    else None."""
    if budget is None:
        return DecodePlan(0, Checkpointing.NONE, graph.plain)
    for level in Checkpointing:
        one = graph.at(level) * ALLOCATOR_SLACK
        if one * batch <= budget:
            return DecodePlan(0, level, graph.at(level))
        if one <= budget:
            return DecodePlan(min(int(budget // one), batch), level, graph.at(level))
    return None


class SlicedDecode(torch.autograd.Function):
    """``decode(x0)`` with no graph in the forward; the backward recomputes it slice by slice
    (``plan.slice_size`` samples) at the plan's checkpointing level, and returns the VJP w.r.t.
    ``x0`` (the decoder's weights are frozen)."""

    @staticmethod
    def forward(ctx, x0, decode, plan: DecodePlan):
        ctx.decode, ctx.plan = decode, plan
        ctx.save_for_backward(x0)
        step = plan.slice_size or len(x0)
        return torch.cat([decode(x0[k:k + step]) for k in range(0, len(x0), step)])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x0,) = ctx.saved_tensors
        step, parts = ctx.plan.slice_size or len(x0), []
        with checkpointed_decoder(ctx.plan.checkpointing):
            for k in range(0, len(x0), step):
                x = x0[k:k + step].detach().requires_grad_()
                with torch.enable_grad():
                    image = ctx.decode(x)
                parts.append(torch.autograd.grad(image, x, grad[k:k + step])[0])
                del image
        return torch.cat(parts), None, None
