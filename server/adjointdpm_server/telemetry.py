"""Per-request telemetry as one server interceptor: a request ID (the client's ``x-request-id``
or a fresh one, echoed in the response metadata and put on every log line of the request,
task threads included), and the request counter and latency histogram by RPC and status.

Logs are JSON lines (``configure_logging``) so that a cluster's log pipeline can index them.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
import uuid

import grpc

__all__ = ["REQUEST_ID", "TelemetryInterceptor", "configure_logging", "JsonFormatter"]

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
                 "msg": record.getMessage(), "request_id": REQUEST_ID.get()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: int = logging.INFO, json_lines: bool = True) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _code(context, failed: bool) -> str:
    code = context.code()
    if code is not None:
        return code.name
    if failed:
        return "CANCELLED" if not context.is_active() else "UNKNOWN"
    return "OK"


class TelemetryInterceptor(grpc.ServerInterceptor):
    def __init__(self, metrics=None):
        self.metrics = metrics
        self.log = logging.getLogger("adjointdpm.requests")

    def _begin(self, details, context) -> tuple[contextvars.Token, float]:
        given = dict(details.invocation_metadata or ()).get("x-request-id", "")
        rid = given[:64] if given and given.isprintable() else uuid.uuid4().hex[:16]
        context.send_initial_metadata((("x-request-id", rid),))
        return REQUEST_ID.set(rid), time.perf_counter()

    def _end(self, rpc: str, context, start: float, failed: bool, token) -> None:
        code = _code(context, failed)
        elapsed = time.perf_counter() - start
        if self.metrics is not None:
            self.metrics.requests.labels(rpc=rpc, code=code).inc()
            self.metrics.latency.labels(rpc=rpc).observe(elapsed)
        self.log.info("%s %s in %.3f s", rpc, code, elapsed)
        try:
            REQUEST_ID.reset(token)
        except ValueError:  # a stream closed from another context (client gone): nothing to undo
            pass

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        rpc = details.method.rsplit("/", 1)[-1]
        if handler.response_streaming:
            inner = handler.stream_stream if handler.request_streaming else handler.unary_stream

            def streaming(request, context):
                token, start = self._begin(details, context)
                failed = True
                try:
                    yield from inner(request, context)
                    failed = False
                finally:
                    self._end(rpc, context, start, failed, token)

            make = (grpc.stream_stream_rpc_method_handler if handler.request_streaming
                    else grpc.unary_stream_rpc_method_handler)
            return make(streaming, handler.request_deserializer, handler.response_serializer)
        inner = handler.stream_unary if handler.request_streaming else handler.unary_unary

        def unary(request, context):
            token, start = self._begin(details, context)
            failed = True
            try:
                result = inner(request, context)
                failed = False
                return result
            finally:
                self._end(rpc, context, start, failed, token)

        make = (grpc.stream_unary_rpc_method_handler if handler.request_streaming
                else grpc.unary_unary_rpc_method_handler)
        return make(unary, handler.request_deserializer, handler.response_serializer)
