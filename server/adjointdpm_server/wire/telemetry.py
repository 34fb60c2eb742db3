"""Per-request telemetry as one server interceptor: a request ID (the client's ``x-request-id``
or a fresh one, echoed in the response metadata and put on every log line of the request,
task threads included), the request counter and latency histogram by RPC and the status the
client saw, and INVALID_ARGUMENT (not INTERNAL) for request bytes that do not decode.
"""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import contextmanager

import grpc

from ..errors import InvalidArgument
from ..telemetry import tracing
from ..telemetry.logs import REQUEST_ID, TENANT
from ._handlers import wrap

__all__ = ["TelemetryInterceptor"]

def _code(context, failed: bool) -> str:
    """The status the client saw: the one set, else — when the call was over before the handler
    was — DEADLINE_EXCEEDED if its deadline passed, CANCELLED (a cancel or a disconnect), else OK."""
    code = context.code()
    if code is not None:
        return code.name
    if not context.is_active():
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    return "UNKNOWN" if failed else "OK"


class _Undecodable:
    """What a request that is not a valid message of its type deserializes to."""


def _tolerant(deserializer):
    if deserializer is None:
        return None

    def parse(data):
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 — answered INVALID_ARGUMENT by the handler below
            return _Undecodable()
    return parse


def _refuse_undecodable(context):
    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                  "the request could not be decoded as a message of this RPC's type")


def _checked_stream(requests, context):
    """A request stream whose undecodable message raises INVALID_ARGUMENT where it is read (the
    job's reader turns it into the call's status)."""
    for message in requests:
        if isinstance(message, _Undecodable):
            raise InvalidArgument("a message on the stream could not be decoded as this RPC's type")
        yield message


def _checked(request, context, streaming: bool):
    if streaming:
        return _checked_stream(request, context)
    if isinstance(request, _Undecodable):
        _refuse_undecodable(context)
    return request


class TelemetryInterceptor(grpc.ServerInterceptor):
    """``tenants`` (auth.Tenants) resolves each call's tenant; without it every call is
    ``default``."""

    def __init__(self, metrics=None, tenants=None):
        self.metrics, self.tenants = metrics, tenants
        self.log = logging.getLogger("adjointdpm.requests")

    def _begin(self, details, context) -> tuple[tuple, float]:
        given = dict(details.invocation_metadata or ()).get("x-request-id", "")
        rid = given[:64] if given and given.isprintable() else uuid.uuid4().hex[:16]
        # echoed in the response headers, sent with the first response (``_send_headers``), not
        # now: a call refused before it answers stays Trailers-Only, so a client's retry policy
        # may retry it (on another replica); a refusal carries it in its trailers instead
        context.set_trailing_metadata((("x-request-id", rid),))
        tenant = (self.tenants.of_metadata(details.invocation_metadata) if self.tenants is not None
                  else "default")
        TENANT.set(tenant)
        span = tracing.rpc_span(details.method.rsplit("/", 1)[-1], details.invocation_metadata)
        return (REQUEST_ID.set(rid), span), time.perf_counter()

    def _end(self, rpc: str, context, start: float, failed: bool, tokens) -> None:
        token, span = tokens
        code = _code(context, failed)
        elapsed = time.perf_counter() - start
        if self.metrics is not None:
            self.metrics.requests.labels(rpc=rpc, code=code).inc()
            self.metrics.latency.labels(rpc=rpc).observe(elapsed)
        self.log.info("%s %s in %.3f s", rpc, code, elapsed)
        tracing.end_rpc_span(*span, code)
        try:
            REQUEST_ID.reset(token)
        except ValueError:  # a stream closed from another context (client gone): nothing to undo
            pass

    @staticmethod
    def _send_headers(context) -> None:
        """The request ID as the response's headers, just before its first message."""
        rid = REQUEST_ID.get(None)
        if rid:
            context.send_initial_metadata((("x-request-id", rid),))

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        rpc = details.method.rsplit("/", 1)[-1]

        @contextmanager
        def observed(request, context):
            token, start = self._begin(details, context)
            failed = True
            try:
                yield _checked(request, context, handler.request_streaming)
                failed = False
            finally:
                self._end(rpc, context, start, failed, token)

        return wrap(handler, observed, request_deserializer=_tolerant(handler.request_deserializer),
                    before_response=self._send_headers)
