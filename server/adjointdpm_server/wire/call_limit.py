"""A cap on concurrent calls that never locks out health checks.

gRPC's own ``maximum_concurrent_rpcs`` counts every call, so 64 never-ending ``Health/Watch``
streams or 64 silent bidi streams would make even ``Health/Check`` answer RESOURCE_EXHAUSTED and
a kubelet restart the pod. Here ``Health/Check`` is never counted; ``Health/Watch`` streams have
their own small budget; every other call counts against ``max_calls``. The handler thread pool
is larger than both budgets together, so a health check always finds a thread.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from functools import partial

import grpc

from ._handlers import wrap
from .auth import HEALTH_CHECK

__all__ = ["CallLimitInterceptor", "HEALTH_WATCH", "pool_size"]

HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
SPARE_THREADS = 16  # for health checks and for refusing calls over the limits


def pool_size(max_calls: int, max_watches: int) -> int:
    return max_calls + max_watches + SPARE_THREADS


class _Budget:
    def __init__(self, limit: int, what: str):
        self.limit, self.what, self.used = limit, what, 0
        self._lock = threading.Lock()

    def take(self, context) -> None:
        with self._lock:
            if self.used >= self.limit:
                refused = True
            else:
                self.used += 1
                refused = False
        if refused:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"the server is at its limit of {self.limit} concurrent {self.what}; retry later")

    def give(self) -> None:
        with self._lock:
            self.used -= 1


@contextmanager
def _holding(budget: _Budget, request, context):
    """One unit of ``budget`` held while the call's behaviour runs."""
    budget.take(context)
    try:
        yield request
    finally:
        budget.give()


class CallLimitInterceptor(grpc.ServerInterceptor):
    def __init__(self, max_calls: int, max_watches: int):
        self.calls = _Budget(max_calls, "calls")
        self.watches = _Budget(max_watches, "health watch streams")

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method == HEALTH_CHECK:
            return handler
        budget = self.watches if details.method == HEALTH_WATCH else self.calls
        return wrap(handler, partial(_holding, budget))
