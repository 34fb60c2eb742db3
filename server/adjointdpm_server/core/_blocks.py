"""Activation checkpointing inside the network, for ``auto`` (docs/design.md §2.4.1).

When one step's graph does not fit the memory budget, ``auto`` recomputes every step in the
backward pass (``checkpoint``) *and* checkpoints inside the network: only each block's inputs are
saved, and a block's activations exist while its own backward runs (diffusers' gradient
checkpointing, which calls ``checkpoint_block`` for each of its blocks). The choice is made per
gradient pass and carried by a context variable, so a resident network shared by many jobs is
never switched for all of them: a network call checkpoints its blocks only in a context where
``blocks_checkpointed()`` is on.

A block recomputed in the backward pass runs outside the call that first ran it; a network whose
calls set state around them (a bank of adapters: each row's adapter, the trained weights swapped
in) says how to re-enter that state with :func:`recomputed_in`.
"""

from __future__ import annotations

import abc
import contextvars
from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager

from torch.utils.checkpoint import checkpoint

__all__ = ["BlockCheckpointing", "checkpoint_block", "checkpointed_blocks", "blocks_checkpointed",
           "recomputed_in", "enable_block_checkpointing"]

_ON = contextvars.ContextVar("adjointdpm_blocks_checkpointed", default=False)
_STATE = contextvars.ContextVar("adjointdpm_block_recompute_state", default=None)


class BlockCheckpointing(abc.ABC):
    """A network that checkpoints its blocks' activations while :func:`checkpointed_blocks` is on
    (a backend wrapper declares it; the planner reads it and never asks the network anything)."""

    checkpoints_blocks: bool = True


def blocks_checkpointed() -> bool:
    """Whether network calls made in this context checkpoint their blocks."""
    return _ON.get()


@contextmanager
def checkpointed_blocks(on: bool = True):
    """Network calls in this block (and in contexts copied from it) checkpoint their blocks."""
    token = _ON.set(bool(on))
    try:
        yield
    finally:
        _ON.reset(token)


@contextmanager
def recomputed_in(state: Callable[[], ContextManager] | None):
    """Blocks checkpointed in this block are recomputed inside ``state()``: the context the
    network's call ran in, re-entered for the backward pass's recomputation."""
    token = _STATE.set(state)
    try:
        yield
    finally:
        _STATE.reset(token)


def checkpoint_block(block, *args):
    """diffusers' ``gradient_checkpointing_func``: ``block(*args)`` itself, or under
    ``torch.utils.checkpoint`` (non-reentrant) while blocks are checkpointed in this context."""
    if not _ON.get():
        return block(*args)
    state = _STATE.get()
    if state is None:
        return checkpoint(block.__call__, *args, use_reentrant=False)
    return checkpoint(block.__call__, *args, use_reentrant=False,
                      context_fn=lambda: (nullcontext(), state()))


def enable_block_checkpointing(module) -> None:
    """Route a diffusers model's block checkpointing through :func:`checkpoint_block` (off until
    a context turns it on)."""
    module.enable_gradient_checkpointing(checkpoint_block)
