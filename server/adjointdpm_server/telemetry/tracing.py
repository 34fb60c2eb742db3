"""Optional OpenTelemetry tracing: a span per RPC, child spans for its phases.

Off unless OpenTelemetry is installed (the ``tracing`` extra) *and* a tracer provider is set:
``configure_from_env()`` sets one from the standard variables (``OTEL_TRACES_EXPORTER=console``
or ``otlp``, or an ``OTEL_EXPORTER_OTLP_ENDPOINT``; ``OTEL_SERVICE_NAME``), an embedding process
may set its own. The RPC span continues the caller's W3C trace context (``traceparent`` in the
call's metadata, which the SDK sends); its children are ``adjointdpm.queue`` (waiting for a job
slot), ``adjointdpm.forward`` (each sampling solve), ``adjointdpm.client_loss`` (each round trip
to the caller's loss) and ``adjointdpm.backward`` (each gradient pass). Task threads inherit the
span through the copied context, and JSON log lines carry its trace id.
"""

from __future__ import annotations

import contextlib
import os
import time

try:
    from opentelemetry import context as _context
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace
except ImportError:  # the extra is not installed: every call below is a no-op
    _trace = None

__all__ = ["rpc_span", "span", "record", "trace_id", "configure_from_env"]

_NAME = "adjointdpm"
SERVICE = "adjointdpm.v1.AdjointDPMService"  # the proto service (tests hold it to the descriptor)


def _tracer():
    return _trace.get_tracer(_NAME) if _trace is not None else None


def rpc_span(method: str, metadata):
    """``(token, span)`` of a server span for ``method``, child of the caller's ``traceparent``
    and current until :func:`end_rpc_span`; ``(None, None)`` without OpenTelemetry."""
    if _trace is None:
        return None, None
    parent = _propagate.extract({k: v for k, v in (metadata or ()) if isinstance(v, str)})
    s = _tracer().start_span(f"adjointdpm/{method}", context=parent, kind=_trace.SpanKind.SERVER,
                             attributes={"rpc.system": "grpc", "rpc.service": SERVICE,
                                         "rpc.method": method})
    return _context.attach(_trace.set_span_in_context(s, parent)), s


def end_rpc_span(token, s, code: str) -> None:
    if s is None:
        return
    s.set_attribute("rpc.grpc.status_code", code)
    if code not in ("OK",):
        s.set_status(_trace.Status(_trace.StatusCode.ERROR, code))
    s.end()
    try:
        _context.detach(token)
    except ValueError:  # ended from another context (a stream the client left): nothing to undo
        pass


@contextlib.contextmanager
def span(name: str, **attributes):
    """A child span of the current one around a block (a no-op without OpenTelemetry)."""
    if _trace is None:
        yield None
        return
    with _tracer().start_as_current_span(name, attributes=attributes) as s:
        yield s


def record(name: str, start_monotonic: float, **attributes) -> None:
    """A child span that began at ``start_monotonic`` (``time.monotonic()``) and ends now."""
    if _trace is None:
        return
    elapsed_ns = int((time.monotonic() - start_monotonic) * 1e9)
    now = time.time_ns()
    _tracer().start_span(name, attributes=attributes, start_time=now - elapsed_ns).end(end_time=now)


def trace_id() -> str:
    """The current trace id (32 hex digits), or "-"."""
    if _trace is None:
        return "-"
    ctx = _trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else "-"


def configure_from_env() -> bool:
    """Install a tracer provider from the standard ``OTEL_*`` variables; False when they ask for
    none (or OpenTelemetry's SDK is not installed)."""
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "")
    if not exporter_name and os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        exporter_name = "otlp"
    if _trace is None or exporter_name in ("", "none"):
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    elif exporter_name == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter  # the otlp extra

        exporter = OTLPSpanExporter()
    else:
        raise ValueError(f"OTEL_TRACES_EXPORTER={exporter_name!r}: this server knows console and otlp")
    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", _NAME)}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _trace.set_tracer_provider(provider)
    return True
