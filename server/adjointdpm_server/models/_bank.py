"""``AdapterBank``: many LoRA adapters on one resident network, each row of a call through its own.

The base model runs once for the whole batch; each row's LoRA delta (its own A, B, rank and
scale) is added for that row only: peft's LoRA layers get the rows' adapters (``adapter_names=``),
and a LoRA ``Linear`` runs them as Punica's gathered LoRA (``_grouped_forward``: two batched
matmuls for all adapters; docs/design.md §5, "Many adapters"). Adapters live in one shared copy
of the network (``net``: the base tensors are the resident model's) under names of their own; a request
holds an :class:`AdapterView` — its adapter as an ``eps_fn`` that declares ``core.SharedRows``,
so the engine runs views of one bank as one call. An all-base call runs the resident network
itself (no LoRA layer in the way).

The bank is sized in bytes: adapters are loaded on demand, the least recently used one that no
live view holds is evicted, and an adapter in use is never evicted (a view pins it). A trained
adapter (a fine-tune, a weight gradient) is one of the rows too: its weights are the view's own
leaves, put in place of its placeholders for each call (``torch.func.functional_call``), so a
batched VJP's gradient w.r.t. them is its rows' alone; the bank's own LoRA tensors never require
grad (peft flips those flags while it injects; nobody differentiates them).
"""

from __future__ import annotations

import gc
import threading
import time
import types
import weakref
from collections import Counter, OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module  # what functional_call enters

from ..core import BlockCheckpointing, SharedRows, recomputed_in
from ..errors import ResourceExhausted
from ._adapters import _shared_copy as shared_copy
from ._adapters import inject_lora

__all__ = ["AdapterBank", "AdapterView", "AdapterSpec", "BankStats", "BASE", "MixedRowsUnsupported"]

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
CANONICAL = "default"  # the adapter name in saved states (peft's, and this service's artifacts)


class MixedRowsUnsupported(ValueError):
    """A LoRA layer saw a batch whose rows do not match the call's rows (a network that folds
    the batch): that network's adapters run in separate calls."""


@dataclass(frozen=True)
class AdapterSpec:
    """What a saved adapter is: its LoRA rank, alpha (None: the rank) and target modules."""

    rank: int
    alpha: float | None
    targets: tuple[str, ...]


@dataclass
class BankStats:
    """Counts for metrics, tests and benchmarks."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    load_seconds: float = 0.0
    fallbacks: int = 0  # mixed calls this bank could not run (separate calls since)
    distinct: Counter = field(default_factory=Counter)  # calls by distinct adapters in them


class _Rows(threading.local):
    """What the call running on this thread tells the LoRA layers: each row's adapter, whether
    stacked weights may be kept (no trained adapter's weights in it), and the row layout of
    each set of adapters present in a layer, computed once per call."""

    labels: list | None = None
    cacheable: bool = False
    layouts: dict | None = None

    def layout(self, layer, present: tuple, labels: list, device):
        """(which adapter of ``present`` each of its rows takes, those rows' indices or None for
        all, each row's scale (rows, 1, 1)) — shared by the layers with the same adapters and
        scales."""
        scales = tuple(layer.scaling[a] for a in present)
        key = (present, scales)
        found = self.layouts.get(key)
        if found is None:
            group = {a: j for j, a in enumerate(present)}
            rows = [i for i, a in enumerate(labels) if a in group]
            which = torch.tensor([group[labels[i]] for i in rows], device=device)
            index = None if len(rows) == len(labels) else torch.tensor(rows, device=device)
            dtype = layer.lora_A[present[0]].weight.dtype
            scale = torch.tensor(scales, dtype=dtype, device=device)[which].view(-1, 1, 1)
            found = self.layouts[key] = (which, index, scale)
        return found


@dataclass(eq=False)
class _Entry:
    name: str                        # the adapter's name in ``net``
    tensors: dict[str, torch.Tensor]  # canonical name → the adapter's tensor (the view's leaves)
    placeholders: dict[str, str]     # canonical name → the parameter's name in ``net``
    nbytes: int
    trainable: bool
    spec: AdapterSpec
    views: weakref.WeakSet = field(default_factory=weakref.WeakSet)


class AdapterView(nn.Module, SharedRows, BlockCheckpointing):
    """One adapter of a bank (or the base, ``adapter`` None) as ``eps_fn(x, t, cond)``.

    Its parameters are the base's and its adapter's, under the names a peft copy would give
    them (``…lora_A.default.weight``), so a view trains, saves and restores like that copy.
    While it lives, its adapter stays in the bank."""

    def __init__(self, bank: "AdapterBank", entry: _Entry | None):
        super().__init__()
        self.base = bank.base  # a submodule: parameters() lists the resident weights
        object.__setattr__(self, "bank", bank)
        object.__setattr__(self, "entry", entry)
        self.label = BASE if entry is None else entry.name
        base = bank.base
        self.checkpoints_blocks = isinstance(base, BlockCheckpointing) and base.checkpoints_blocks
        self._canonical: dict[str, str] = {}
        if entry is not None:
            entry.views.add(self)
            for i, (name, tensor) in enumerate(entry.tensors.items()):
                param = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)
                self.register_parameter(f"adapter_{i}", param)
                self._canonical[f"adapter_{i}"] = name

    @property
    def shares(self):
        return self.bank.shares(self)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        """The base's names, then the adapter's canonical ones (a peft copy's)."""
        yield from self.base.named_parameters(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)
        for own, name in self._canonical.items():
            yield (f"{prefix}.{name}" if prefix else name), self._parameters[own]

    def trainable_weights(self) -> dict[str, torch.Tensor]:
        """Canonical name → the leaf each call puts in place of the adapter's placeholder."""
        if self.entry is None or not self.entry.trainable:
            return {}
        return {self.entry.placeholders[self._canonical[own]]: p for own, p in self._parameters.items()}

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        return self.bank.run_rows(x, t, cond, [(self, int(x.shape[0]))])

    def standalone(self) -> nn.Module:
        """This adapter on a peft copy of the base of its own (the base itself for ``BASE``),
        frozen: what to copy further (a trainable view of its base weights)."""
        from ._adapters import load_adapter

        if self.entry is None:
            return self.base
        spec = self.entry.spec
        state = {self._canonical[own]: p.detach() for own, p in self._parameters.items()}
        return load_adapter(self.base, "lora", state, rank=spec.rank, alpha=spec.alpha, targets=spec.targets)

    def run_rows(self, x, t, cond, parts):
        return self.bank.run_rows(x, t, cond, parts)


class AdapterBank:
    """The adapters of one resident network under a byte budget (``budget_bytes``)."""

    def __init__(self, eps_fn: nn.Module, budget_bytes: int, *, mixed: bool = True):
        if budget_bytes < 0:
            raise ValueError("the adapter bank's budget must be >= 0 bytes")
        self.base = eps_fn
        self.budget = int(budget_bytes)
        self.mixed = mixed  # False: every adapter runs in calls of its own (today's behaviour)
        self.stats = BankStats()
        self.net = _fixed_placement(shared_copy(eps_fn), eps_fn)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # by artifact id, LRU first
        self._owned: list[_Entry] = []  # jobs' trainable adapters, deleted ones: freed when unused
        self._lock = threading.RLock()  # the network's structure and the row labels
        self._loading: dict[str, threading.Event] = {}
        self._rows = _Rows()
        self.generation = 0  # changes of the adapters in ``net``
        self._hooked: set[int] = set()
        self._serial = 0
        self.base_view = AdapterView(self, None)

    # -- what the server asks --------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._all())

    @property
    def resident(self) -> int:
        return len(self._entries) + len(self._owned)

    def shares(self, view: AdapterView):
        """Views of one bank share calls; with mixing off, only views of one adapter do."""
        return (id(self), None) if self.mixed else (id(self), view.label)

    def view(self, key: str, load: Callable[[], tuple[Mapping[str, torch.Tensor], AdapterSpec]]) -> AdapterView:
        """The adapter saved as ``key`` (``load`` reads its tensors and spec on a miss), pinned
        while the view lives; RESOURCE_EXHAUSTED when the adapters in use leave no room."""
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self.stats.hits += 1
                    return AdapterView(self, entry)
                pending = self._loading.get(key)
                if pending is None:
                    pending = self._loading[key] = threading.Event()
                    break
            pending.wait()  # another request is loading it: use theirs
        try:
            started = time.perf_counter()
            tensors, spec = load()
            with self._lock:
                entry = self._add(key, dict(tensors), spec, trainable=False)
                view = AdapterView(self, entry)
                self.stats.misses += 1
                self.stats.load_seconds += time.perf_counter() - started
            return view
        finally:
            with self._lock:
                self._loading.pop(key).set()

    def trainable(self, tensors: Mapping[str, torch.Tensor], spec: AdapterSpec) -> AdapterView:
        """A job's own adapter to train, starting from ``tensors`` (canonical names): a view whose
        adapter weights are fresh leaves that require grad; removed when the view is dropped."""
        leaves = {k: nn.Parameter(v.detach().clone(), requires_grad=True) for k, v in tensors.items()}
        with self._lock:
            return AdapterView(self, self._add("", leaves, spec, trainable=True))

    def release_unused(self) -> None:
        """Drop the trainable and forgotten adapters whose views are gone (their jobs ended)."""
        with self._lock:
            for entry in [e for e in self._owned if not e.views]:
                self._owned.remove(entry)
                self._remove(entry)

    def forget(self, key: str) -> None:
        """The adapter saved as ``key`` is gone (deleted): never served again; removed now, or
        when the requests using it end (its bytes count until then)."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._owned.append(entry)  # like a job's own adapter: released when unused
                self.release_unused()

    # -- the call --------------------------------------------------------------------------------
    def run_rows(self, x: torch.Tensor, t: torch.Tensor, cond, parts: Sequence[tuple[AdapterView, int]]):
        """One call: each part's rows through its view's adapter (peft's mixed batch)."""
        labels: list[str] = []
        weights: dict[str, torch.Tensor] = {}
        for view, rows in parts:
            labels += [view.label] * rows
            weights.update(view.trainable_weights())
        distinct = {label for label in labels if label != BASE}
        self.stats.distinct[len(distinct)] += 1
        if not distinct:
            return self.base(x, t, cond)

        def state():
            return self._call_state(labels, weights)
        # a block checkpointed inside the network recomputes in this same state (core/_blocks.py)
        with state(), recomputed_in(state):
            try:
                return self.net(x, t, cond)
            except MixedRowsUnsupported:
                self.stats.fallbacks += 1
                self.mixed = False  # from now on each adapter in calls of its own
                raise

    @contextmanager
    def _call_state(self, labels: list, weights: dict):
        """What the LoRA layers of ``net`` read during one call — each row's adapter, the
        trained adapters' leaves in place of their placeholders (``functional_call``'s swap) —
        entered by the call, and again by a block's recomputation in its backward pass."""
        with self._lock:
            saved = self._rows.labels, self._rows.cacheable, self._rows.layouts
            self._rows.labels, self._rows.cacheable, self._rows.layouts = labels, not weights, {}
            try:
                with (_reparametrize_module(self.net, weights, tie_weights=True, strict=False)
                      if weights else nullcontext()):
                    yield
            finally:
                self._rows.labels, self._rows.cacheable, self._rows.layouts = saved

    def _label_rows(self, module, args, kwargs):
        """A forward pre-hook on every LoRA layer of ``net``: the call's row labels."""
        labels = self._rows.labels
        if labels is None:
            raise RuntimeError("the bank's network runs only through run_rows")
        rows = args[0].shape[0] if args else next(iter(kwargs.values())).shape[0]
        if rows != len(labels):
            if len(set(labels)) > 1:
                raise MixedRowsUnsupported(f"a LoRA layer saw {rows} rows in a call of {len(labels)}")
            labels = labels[:1] * rows
        return args, {**kwargs, "adapter_names": labels}

    # -- the bank's contents (under the lock) ----------------------------------------------------
    def _all(self) -> list[_Entry]:
        return [*self._entries.values(), *self._owned]

    def _make_room(self, nbytes: int) -> None:
        """Evict unpinned adapters, least recently used first, until ``nbytes`` more fit."""
        for attempt in range(2):
            self.release_unused()
            used = self.nbytes
            for key, entry in list(self._entries.items()):
                if used + nbytes <= self.budget:
                    return
                if not entry.views:
                    del self._entries[key]
                    self._remove(entry)
                    self.stats.evictions += 1
                    used -= entry.nbytes
            if used + nbytes <= self.budget:
                return
            if attempt == 0:
                gc.collect()  # a finished request's view may wait in a reference cycle
        pinned = sum(e.nbytes for e in self._all() if e.views)
        raise ResourceExhausted(
            f"the adapter bank is full: adapters in use hold {pinned / 2**20:.1f} MiB of its "
            f"{self.budget / 2**20:.1f} MiB and this one needs {nbytes / 2**20:.1f} MiB "
            f"(--adapter-cache-mib)", retry_after_s=1.0)

    def _add(self, key: str, tensors: dict[str, torch.Tensor], spec: AdapterSpec, *, trainable: bool) -> _Entry:
        nbytes = sum(v.numel() * v.element_size() for v in tensors.values())
        self._make_room(nbytes)
        self._serial += 1
        entry = _Entry(f"adapter{self._serial}", tensors, {}, nbytes, trainable, spec)
        inject_lora(self.net, spec.rank, spec.alpha, spec.targets, entry.name)
        try:
            self._place(entry)
        except ValueError:
            self._remove(entry)
            raise
        (self._owned.append(entry) if trainable else self._entries.__setitem__(key, entry))
        return entry

    def _place(self, entry: _Entry) -> None:
        """Put the adapter's tensors in place of the injected weights; hook new LoRA layers."""
        infix = f".{entry.name}."
        own = {n.replace(infix, f".{CANONICAL}."): (n, p) for n, p in self.net.named_parameters()
               if infix in n}
        unknown = sorted(set(entry.tensors) - set(own))
        missing = sorted(set(own) - set(entry.tensors))
        if unknown or missing:
            raise ValueError(f"adapter does not fit this model: {len(unknown)} unknown and "
                             f"{len(missing)} missing tensors (e.g. {(unknown or missing)[0]})")
        device = next(self.base.parameters()).device
        for canonical, (name, param) in own.items():
            value = entry.tensors[canonical]
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"adapter tensor {canonical} has shape {tuple(value.shape)}, "
                                 f"the model's {tuple(param.shape)}")
            owner, _, leaf = name.rpartition(".")
            # the frozen tensor itself (a trained adapter's leaf: its storage), never a copy
            setattr(self.net.get_submodule(owner), leaf,
                    nn.Parameter(value.detach().to(device), requires_grad=False))
            entry.placeholders[canonical] = name
        for param in self.net.parameters():
            param.requires_grad_(False)  # peft's injection sets flags; nobody differentiates these
        self.generation += 1  # weights stacked before are stale
        from peft.tuners.lora import LoraLayer

        from peft.tuners.lora.layer import Linear as LoraLinear

        for module in self.net.modules():
            if isinstance(module, LoraLayer) and id(module) not in self._hooked:
                module.register_forward_pre_hook(self._label_rows, with_kwargs=True)
                if isinstance(module, LoraLinear):
                    module._mixed_batch_forward = types.MethodType(_grouped_forward, module)
                    module.__dict__["_bank"] = self
                self._hooked.add(id(module))

    def _remove(self, entry: _Entry) -> None:
        """Take an adapter out of ``net`` (peft's layers stay, with the others' adapters)."""
        from peft.tuners.lora import LoraLayer

        self.generation += 1
        getattr(self.net, "peft_config", {}).pop(entry.name, None)  # peft's record of it
        for module in self.net.modules():
            if isinstance(module, LoraLayer):
                for attr in (*module.adapter_layer_names, *module.other_param_names):
                    store = getattr(module, attr, None)
                    if isinstance(store, (dict, nn.ModuleDict, nn.ParameterDict)) and entry.name in store:
                        del store[entry.name]


def _fixed_placement(net: nn.Module, like: nn.Module) -> nn.Module:
    """``net`` whose modules answer ``dtype`` and ``device`` without walking their submodules:
    diffusers' ``ModelMixin.dtype`` visits every module (twice per UNet forward), and a bank's
    network gains three per adapter per LoRA layer — with 64 adapters that walk cost more than
    the call. The bank's copy never moves or casts, so the resident network's answer holds."""
    first = next(like.parameters())
    fixed = {"dtype": property(lambda self: first.dtype), "device": property(lambda self: first.device)}
    classes: dict[type, type] = {}
    for module in net.modules():
        cls = type(module)
        if not any(isinstance(getattr(cls, attr, None), property) for attr in fixed):
            continue
        if cls not in classes:
            classes[cls] = type(cls.__name__, (cls,), {a: p for a, p in fixed.items()
                                                      if isinstance(getattr(cls, a, None), property)})
        module.__class__ = classes[cls]
    return net


def _grouped_forward(layer, x: torch.Tensor, *args, adapter_names: list, **kwargs) -> torch.Tensor:
    """peft's mixed-adapter forward of a LoRA ``Linear`` with the rows of every adapter in two
    batched matmuls (Punica's gathered LoRA: each row's A and B, zero-padded to the largest rank
    present, gathered by row, its scale applied between them) instead of two matmuls and an
    indexed add per adapter; zero padding adds exact zeros, so a row's result is its adapter's
    to round-off. All rows on one adapter take peft's unmixed arithmetic; adapters of other
    dtypes or with dropout, peft's own mixed path."""
    labels = dict.fromkeys(adapter_names)
    present = tuple(a for a in labels if a != BASE and a in layer.lora_A)
    if len(labels) == 1 and len(present) == 1 and isinstance(layer.lora_dropout[present[0]], nn.Identity):
        return _one_adapter(layer, x, present[0], *args, **kwargs)
    if len(present) < 2 or len({layer.lora_A[a].weight.dtype for a in present}) > 1 or any(
            not isinstance(layer.lora_dropout[a], nn.Identity) for a in present):
        return type(layer)._mixed_batch_forward(layer, x, *args, adapter_names=adapter_names, **kwargs)
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

    result = layer.base_layer(x, *args, **{k: v for k, v in kwargs.items() if k not in VARIANT_KWARG_KEYS})
    bank = layer.__dict__["_bank"]
    which, index, scale = bank._rows.layout(layer, present, adapter_names, x.device)
    A, B = _stacked(layer, present)
    picked = x if index is None else x[index]
    flat = picked.to(A.dtype).reshape(picked.shape[0], -1, picked.shape[-1])  # (rows, tokens, in)
    h = torch.bmm(flat, A[which].transpose(1, 2)) * scale
    delta = torch.bmm(h, B[which].transpose(1, 2)).reshape(*picked.shape[:-1], B.shape[1])
    if index is None:  # every row has an adapter here: no gather, no indexed add
        return (result + delta).to(result.dtype)
    result[index] += delta.to(result.dtype)
    return result


def _stacked(layer, present: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B of ``present`` stacked, zero-padded to their largest rank; kept on the layer for
    the next call with the same adapters unless a trained adapter's weights are in this call
    (``_Rows.cacheable`` false: they change between calls) or the bank changed since."""
    bank = layer.__dict__["_bank"]
    key, cacheable = (bank.generation, present), bank._rows.cacheable
    cached = layer.__dict__.get("_bank_stack")
    if cacheable and cached is not None and cached[0] == key:
        return cached[1], cached[2]
    rank = max(layer.r[a] for a in present)
    pad = torch.nn.functional.pad
    weights = [_weights(layer, a, cacheable) for a in present]
    A = torch.stack([w if w.shape[0] == rank else pad(w, (0, 0, 0, rank - w.shape[0])) for w, _ in weights])
    B = torch.stack([w if w.shape[1] == rank else pad(w, (0, rank - w.shape[1])) for _, w in weights])
    layer.__dict__["_bank_stack"] = (key, A, B) if cacheable else None
    return A, B


def _weights(layer, adapter: str, cacheable: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one adapter in ``layer``, looked up once per bank generation for frozen ones
    (a trained adapter's are the leaves a call swaps in: looked up each time)."""
    if not cacheable:
        return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    generation = layer.__dict__["_bank"].generation
    table = layer.__dict__.get("_bank_weights")
    if table is None or table[0] != generation:
        table = layer.__dict__["_bank_weights"] = (generation, {})
    found = table[1].get(adapter)
    if found is None:
        found = table[1][adapter] = (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight)
    return found


def _one_adapter(layer, x: torch.Tensor, adapter: str, *args, **kwargs) -> torch.Tensor:
    """Every row on one adapter: peft's own unmixed arithmetic (no gather, no indexed add), so a
    request alone costs what a peft copy of its adapter costs."""
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

    result = layer.base_layer(x, *args, **{k: v for k, v in kwargs.items() if k not in VARIANT_KWARG_KEYS})
    lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
    return (result + lora_B(lora_A(x.to(lora_A.weight.dtype))) * layer.scaling[adapter]).to(result.dtype)
