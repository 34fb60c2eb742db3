"""A cap on concurrent calls that never locks out health checks.

gRPC's own ``maximum_concurrent_rpcs`` counts every call, so 64 never-ending ``Health/Watch``
streams or 64 silent bidi streams would make even ``Health/Check`` answer RESOURCE_EXHAUSTED and
a kubelet restart the pod. Here ``Health/Check`` is never counted; ``Health/Watch`` streams have
their own small budget; every other call counts against ``max_calls``. The handler thread pool
is larger than both budgets together, so a health check always finds a thread.
"""

from __future__ import annotations

import threading

import grpc

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


def _counted(handler, budget: _Budget):
    """The same handler, holding one unit of ``budget`` while its behaviour runs."""
    if handler.response_streaming:
        inner = handler.stream_stream if handler.request_streaming else handler.unary_stream

        def streaming(request, context):
            budget.take(context)
            try:
                yield from inner(request, context)
            finally:
                budget.give()

        make = (grpc.stream_stream_rpc_method_handler if handler.request_streaming
                else grpc.unary_stream_rpc_method_handler)
        return make(streaming, handler.request_deserializer, handler.response_serializer)
    inner = handler.stream_unary if handler.request_streaming else handler.unary_unary

    def unary(request, context):
        budget.take(context)
        try:
            return inner(request, context)
        finally:
            budget.give()

    make = (grpc.stream_unary_rpc_method_handler if handler.request_streaming
            else grpc.unary_unary_rpc_method_handler)
    return make(unary, handler.request_deserializer, handler.response_serializer)


class CallLimitInterceptor(grpc.ServerInterceptor):
    def __init__(self, max_calls: int, max_watches: int):
        self.calls = _Budget(max_calls, "calls")
        self.watches = _Budget(max_watches, "health watch streams")

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method == HEALTH_CHECK:
            return handler
        return _counted(handler, self.watches if details.method == HEALTH_WATCH else self.calls)
