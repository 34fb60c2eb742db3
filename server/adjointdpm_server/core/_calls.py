"""What a job's network calls carry to whichever thread runs them (docs/design.md §2.4.1).

Saved-tensor hooks are per thread, and a service may run a job's network call on a thread of its
own (the batching engine). A job sets the scope its calls must run in with ``network_calls_in``;
a wrapper that runs a call elsewhere copies the job's context (``contextvars.copy_context``) and
enters ``network_call_scope()`` around the call there. ``auto`` uses it to watch the first
step's graph grow (core/_memory.py: ``GraphGuard``) wherever the network runs.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager

__all__ = ["network_calls_in", "network_call_scope"]

_SCOPE = contextvars.ContextVar("adjointdpm_network_call_scope", default=None)


@contextmanager
def network_calls_in(scope: Callable[[], ContextManager] | None):
    """Network calls made in this block (on any thread, in a copy of this context) run inside
    ``scope()``."""
    token = _SCOPE.set(scope)
    try:
        yield
    finally:
        _SCOPE.reset(token)


def network_call_scope() -> ContextManager:
    """The scope this context's network calls run in (a wrapper enters it on the calling thread)."""
    scope = _SCOPE.get()
    return nullcontext() if scope is None else scope()
