"""Memory planning for ``grad_mode="auto"`` and the anchored ``adjoint`` (docs/design.md §2.4.1).

A gradient through N steps holds two kinds of memory: the solver states ``y_i`` (one latent each,
kilobytes) and, for every step whose graph is kept, the activations autograd saves inside the
network call (tens of megabytes to gigabytes). With states this cheap, the time-optimal schedule
for a budget of ``k`` graphs is not revolve's binomial one (which trades recomputed *states*
against stored ones, when states are the memory): every state is stored, the last ``k`` network
calls keep their graphs, and the first ``N − k`` are recomputed one at a time in the backward
pass. Backward visits the steps last-first, so the kept graphs are all freed before the first
recomputation and the peak is ``max(k, 1)`` graphs plus the states; every kept graph saves one
forward call, and no other choice of ``k`` graphs saves more.

When not even one graph fits (``graph·ALLOCATOR_SLACK + states > budget``) and the network
checkpoints its blocks (core/_blocks.py), the plan also checkpoints inside the network: each
recomputed step then saves only its blocks' inputs, and one block's activations at a time exist
in its backward — a smaller peak for one more forward of the network per step.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.autograd.graph import saved_tensors_hooks

from ._calls import network_calls_in

__all__ = ["graph_bytes", "Tape", "plan_kept_steps", "plan_anchors", "RankedAnchors",
           "default_budget", "ALLOCATOR_SLACK", "MemoryPlan", "plan_blocks", "GraphGuard"]

# What a kept graph really costs over the bytes its saved tensors hold: on CPU, backprop's peak
# exceeds N·graph_bytes by 15–18% at 10 and 20 steps (benchmarks/results/budget.md), the
# allocator's rounding and fragmentation; the plan counts each kept graph at this factor.
ALLOCATOR_SLACK = 1.2


def _storage_key(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr())


_SAVED_NAMES: dict[type, tuple[str, ...]] = {}


def _saved_names(node_type: type) -> tuple[str, ...]:
    """The ``_saved_*`` attributes of an autograd node type (``dir`` once per type: it is slow)."""
    names = _SAVED_NAMES.get(node_type)
    if names is None:
        names = _SAVED_NAMES[node_type] = tuple(n for n in dir(node_type) if n.startswith("_saved_"))
    return names


def graph_bytes(output: torch.Tensor, exclude=()) -> int:
    """Bytes autograd has saved to backpropagate ``output``: the distinct storages of every
    ``grad_fn._saved_*`` tensor reachable from it, less those of ``exclude`` (the weights and
    inputs, which are held anyway). Walking the graph, rather than hooking the saves, also
    counts a network call run on another thread (the service's engine)."""
    skip = {_storage_key(t) for t in exclude if isinstance(t, torch.Tensor)}
    seen_nodes, seen = set(), {}
    stack = [output.grad_fn] if output.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        for name in _saved_names(type(node)):
            try:
                value = getattr(node, name)
            except RuntimeError:  # a saved tensor already freed (retain_graph=False elsewhere)
                continue
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                    key = _storage_key(t)
                    if key not in skip:
                        seen[key] = t.untyped_storage().nbytes()
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return sum(seen.values())


class GraphGuard:
    """Saved-tensor hooks that count the bytes a graph saves as it is built (distinct storages,
    less ``exclude``) and, once they pass ``limit``, keep nothing more: step 0's graph is
    measured without ever holding more than the budget where it would not fit (``over``; its
    output's values stand, its graph is unusable and dropped). Within the limit the tensors are
    kept and the call has its graph as usual. Kept detached: a saved output packed as itself
    would hold its own node, a cycle no collector sees (the whole graph leaked). Dropping, not
    raising: a hook that raises while autograd builds a node leaks the graph built so far."""

    def __init__(self, limit: float, exclude=()):
        self.limit = limit
        self.skip = {_storage_key(t) for t in exclude if isinstance(t, torch.Tensor)}
        self.seen: set = set()
        self.bytes = 0  # past the limit, storages freed and reused may go uncounted: a floor
        self.over = False

    def _pack(self, t: torch.Tensor):
        if t.layout == torch.strided:
            key = _storage_key(t)
            if key not in self.skip and key not in self.seen:
                self.seen.add(key)
                self.bytes += t.untyped_storage().nbytes()
                self.over = self.over or self.bytes > self.limit
        return None if self.over else t.detach()  # not t: a saved output would hold its own node

    @staticmethod
    def _unpack(t):
        if t is None:
            raise RuntimeError("a graph measured past the memory budget cannot be backpropagated")
        return t

    def _hooks(self):
        return saved_tensors_hooks(self._pack, self._unpack)

    @contextmanager
    def watching(self):
        """Watch the calls made in this block, on this thread and wherever they run."""
        with self._hooks(), network_calls_in(self._hooks):
            yield


def plan_kept_steps(steps: int, budget: float, graph: int, state: int) -> int:
    """How many of the last steps keep their graph: the most ``k ≤ steps`` with
    ``k·graph·ALLOCATOR_SLACK + steps·state ≤ budget`` (0 when even one graph does not fit:
    ``checkpoint``)."""
    room = budget - steps * state
    if graph <= 0:
        return steps if room >= 0 else 0
    return max(0, min(steps, int(room // (graph * ALLOCATOR_SLACK))))


def plan_blocks(steps: int, budget: float, graph: int, state: int) -> bool:
    """Whether to checkpoint inside the network: one step's graph does not fit the budget
    beside the states (``checkpoint``'s own peak would exceed it)."""
    return graph > 0 and graph * ALLOCATOR_SLACK + steps * state > budget


@dataclass(frozen=True)
class MemoryPlan:
    """What a gradient pass holds, as planned (reported to the caller: ``sample(on_plan=…)``)."""

    grad_mode: str
    steps: int
    gradient_steps: int      # the last steps the gradient flows through (truncate)
    kept_graphs: int = 0     # auto: the last steps whose graphs the forward pass keeps
    stored_states: int = 0   # solver states held for the backward pass
    blocks_checkpointed: bool = False  # auto: activations checkpointed inside the network
    graph_bytes: int = 0     # one network call's graph as measured (0: not measured)
    budget_bytes: int = 0    # the budget planned for (0: none)


def plan_anchors(steps: int, budget: float | None, state: int, pending: int = 0) -> int:
    """How many exact states the ``adjoint`` keeps (docs/design.md §2.4.1): 0 (``y_N`` only, the
    paper's adjoint, memory flat in N) without a budget; ``steps`` (every state: ``checkpoint``)
    when the budget holds them all; else as many as it holds besides the ``pending`` states a
    ranking keeps until it has rated them."""
    if budget is None:
        return 0
    held = int(budget // max(state, 1))
    return steps if held >= steps else max(0, held - pending)


class RankedAnchors:
    """The ``capacity`` states whose one-step backward reconstruction errs most (design §2.4.1).

    The forward pass rates each ``y_i`` as soon as the ε values the backward re-solve would use
    for it exist (relative error of the reversed step from the exact ``y_{i+1}``; no extra network
    call) and offers it here; the least-erring state is dropped whenever more than ``capacity``
    are held. ``eps_end`` is ``ε̃(y_N)``, evaluated at the end of the forward pass to rate the
    last states and handed to the backward pass, which would otherwise evaluate it itself.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.states: dict[int, torch.Tensor] = {}
        self.errors: dict[int, float] = {}
        self.eps_end: torch.Tensor | None = None

    def offer(self, i: int, y: torch.Tensor, error: float) -> None:
        self.states[i], self.errors[i] = y, error
        if len(self.states) > self.capacity:
            drop = min(self.errors, key=self.errors.get)
            del self.states[drop], self.errors[drop]


def default_budget(device: torch.device) -> int:
    """The budget ``auto`` uses when none is given: half the free memory of ``device`` (CUDA), or
    of the machine's available RAM (CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 2)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2)
    except (ValueError, OSError, AttributeError):
        return 1 << 30


class Tape:
    """The forward pass of ``auto``: runs each network call, keeps the graphs of the last
    ``kept`` steps for the backward pass, and decides ``kept`` — and whether the backward pass
    checkpoints inside the network (``blocks``) — at step 0 from the measured size of one call's
    graph. Backward takes each graph back once (:meth:`take`). ``report`` receives the plan."""

    def __init__(self, vjp, steps: int, budget: float, exclude=(), limit: int | None = None,
                 checkpoints_blocks: bool = False, report=None):
        self.vjp, self.steps, self.budget = vjp, steps, budget
        self.limit = steps if limit is None else limit  # a truncated gradient: its last steps only
        self.exclude = list(exclude)
        self.checkpoints_blocks = checkpoints_blocks  # the network can (core/_blocks.py)
        self.report = report
        self.kept: int | None = None
        self.blocks = False
        self.graphs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _keeps(self, step: int) -> bool:
        return step >= self.steps - self.kept

    def _decide(self, kept: int, graph: int = 0, blocks: bool = False) -> None:
        self.kept, self.blocks = kept, blocks
        if self.report is not None:
            self.report(MemoryPlan("auto", self.steps, self.limit, kept, self.steps, blocks,
                                   int(graph), int(self.budget)))

    def __call__(self, step: int, fn, y: torch.Tensor) -> torch.Tensor:
        """``fn(y, cond, uncond)`` at ``step``; its graph is kept when the plan says so."""
        state = y.numel() * y.element_size()
        if self.kept is None and self.budget < self.steps * state:
            self._decide(0)  # not even the states fit: no graph to measure (a batching server's 0)
        if self.kept is not None and not self._keeps(step):
            with torch.no_grad():
                return fn(y, self.vjp.cond, self.vjp.uncond)
        y_leaf = y.detach().requires_grad_(True)
        if self.kept is None and self.checkpoints_blocks:
            # Where one graph would not fit, stop keeping it there and checkpoint inside.
            guard = GraphGuard((self.budget - self.steps * state) / ALLOCATOR_SLACK,
                               self.exclude + [y_leaf] + self.vjp.targets)
            try:
                with torch.enable_grad(), guard.watching():
                    out = fn(y_leaf, self.vjp.cond, self.vjp.uncond)
            except torch.OutOfMemoryError:  # not even the device held it
                guard.over = True
                out = None
            if guard.over:
                self._decide(0, guard.bytes, blocks=True)
                if out is not None:
                    return out.detach()  # its values stand; its graph holds nothing past the limit
                with torch.no_grad():
                    return fn(y, self.vjp.cond, self.vjp.uncond)
        else:
            with torch.enable_grad():
                out = fn(y_leaf, self.vjp.cond, self.vjp.uncond)
        if self.kept is None:
            graph = graph_bytes(out, self.exclude + [y_leaf] + self.vjp.targets)
            kept = min(self.limit, plan_kept_steps(self.steps, self.budget, graph, state))
            self._decide(kept, graph, self.checkpoints_blocks and plan_blocks(self.steps, self.budget, graph, state))
        if self._keeps(step) and out.requires_grad:
            self.graphs[step] = (y_leaf, out)
        return out.detach()

    def take(self, step: int):
        """The kept ``(y_leaf, out)`` of ``step`` (once), or None to recompute it."""
        return self.graphs.pop(step, None)
