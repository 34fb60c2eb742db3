"""A cap on concurrent calls that never locks out health checks, nor one tenant another.

gRPC's own ``maximum_concurrent_rpcs`` counts every call, so 64 never-ending ``Health/Watch``
streams or 64 silent bidi streams would make even ``Health/Check`` answer RESOURCE_EXHAUSTED and
a kubelet restart the pod. Here ``Health/Check`` is never counted; ``Health/Watch`` streams have
their own small budget; every other call counts against ``max_calls``, per caller (tenant, or
peer when auth is off): when they are all taken, a caller holding less than its even share of
them still gets one of ``overflow`` more, so a burst of one tenant's calls cannot refuse
another's. The handler thread pool is larger than the budgets together, so a health check
always finds a thread.
"""

from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager
from functools import partial

import grpc

from ..telemetry.logs import TENANT
from ._handlers import wrap
from .auth import DEFAULT_TENANT, HEALTH_CHECK, caller_of

__all__ = ["CallLimitInterceptor", "HEALTH_WATCH", "pool_size"]

HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
SPARE_THREADS = 16  # for health checks and for refusing calls over the limits
RETRY_PUSHBACK = "grpc-retry-pushback-ms"


RETRY_AFTER_MS = "1000"  # a refused call's hint: calls are short-lived next to it


def overflow_of(max_calls: int) -> int:
    return max(1, max_calls // 4) if max_calls else 0


def pool_size(max_calls: int, max_watches: int) -> int:
    return max_calls + overflow_of(max_calls) + max_watches + SPARE_THREADS


class _Budget:
    def __init__(self, limit: int, what: str, overflow: int = 0):
        self.limit, self.what, self.overflow = limit, what, overflow
        self.used, self.by_caller = 0, Counter()
        self._lock = threading.Lock()

    def _fits(self, caller: str) -> bool:
        if self.used < self.limit:
            return True
        callers = len(self.by_caller) + (caller not in self.by_caller)
        return self.used < self.limit + self.overflow and self.by_caller[caller] < self.limit // callers

    def take(self, context, caller: str) -> None:
        with self._lock:
            refused = not self._fits(caller)
            if not refused:
                self.used += 1
                self.by_caller[caller] += 1
            held = self.by_caller[caller]
        if refused:
            context.set_trailing_metadata(((RETRY_PUSHBACK, RETRY_AFTER_MS),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"the server is at its limit of {self.limit} concurrent {self.what} (the "
                          f"global limit; {held} of them are yours); retry in 1 s")

    def give(self, caller: str) -> None:
        with self._lock:
            self.used -= 1
            self.by_caller[caller] -= 1
            if self.by_caller[caller] <= 0:
                del self.by_caller[caller]


@contextmanager
def _holding(budget: _Budget, by_tenant: bool, request, context):
    """One unit of ``budget`` held by the call's caller while its behaviour runs."""
    caller = caller_of(context, (TENANT.get() or DEFAULT_TENANT) if by_tenant else None)
    budget.take(context, caller)
    try:
        yield request
    finally:
        budget.give(caller)


class CallLimitInterceptor(grpc.ServerInterceptor):
    """``by_tenant``: callers are tenants (tokens configured; the telemetry interceptor, outside
    this one, has set the tenant), else peers."""

    def __init__(self, max_calls: int, max_watches: int, by_tenant: bool = False):
        self.calls = _Budget(max_calls, "calls", overflow_of(max_calls))
        self.watches = _Budget(max_watches, "health watch streams")
        self.by_tenant = by_tenant

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method == HEALTH_CHECK:
            return handler
        budget = self.watches if details.method == HEALTH_WATCH else self.calls
        return wrap(handler, partial(_holding, budget, self.by_tenant))
