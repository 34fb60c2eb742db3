"""OpenTelemetry: one ComputeGradient with a client loss, called inside a client span, yields the
server span as a child of the client's (W3C traceparent from the SDK) with the queue, forward
solve, client-loss round trip and backward solve as its children, all in the client's trace; the
JSON log line of a traced request carries the trace id. Spans go to the SDK's in-memory exporter."""

import json
import logging

import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import adjointdpm
from adjointdpm_server.config import ServerConfig
from adjointdpm_server.wire import build_server
from adjointdpm_server.telemetry.logs import JsonFormatter


@pytest.fixture(scope="module")
def exporter():
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    trace.set_tracer_provider(provider)  # the process's one provider: this module's tests only
    if trace.get_tracer_provider() is not provider:
        pytest.skip("another tracer provider was installed earlier in this process")
    return spans


def _energy(image):
    return float(np.sum(image ** 2)), 2 * image


def test_compute_gradient_span_tree_joins_the_clients_trace(exporter, tmp_path):
    srv = build_server(ServerConfig(models=("digits",), port=0, artifact_dir=tmp_path / "a"))
    try:
        with adjointdpm.Client(f"127.0.0.1:{srv.port}", timeout=120) as client:
            exporter.clear()
            with trace.get_tracer("test").start_as_current_span("caller") as caller:
                client.compute_gradient(adjointdpm.ClientLoss(_energy, autograd=False), labels=[1, 2],
                                        seed=0, steps=4)
    finally:
        srv.stop(0)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    rpc = spans["adjointdpm/ComputeGradient"]
    trace_id = caller.get_span_context().trace_id
    assert rpc.context.trace_id == trace_id
    assert rpc.parent.span_id == caller.get_span_context().span_id
    assert rpc.kind == trace.SpanKind.SERVER and rpc.attributes["rpc.grpc.status_code"] == "OK"
    for name in ("adjointdpm.queue", "adjointdpm.forward", "adjointdpm.client_loss", "adjointdpm.backward"):
        child = spans[name]
        assert child.context.trace_id == trace_id, name
        assert child.parent.span_id == rpc.context.span_id, name
        assert rpc.start_time <= child.start_time <= child.end_time <= rpc.end_time, name
    forward, loss, backward = spans["adjointdpm.forward"], spans["adjointdpm.client_loss"], spans["adjointdpm.backward"]
    assert forward.end_time <= loss.start_time and loss.end_time <= backward.start_time  # in that order
    assert forward.attributes["steps"] == 4


def test_json_log_lines_carry_the_trace_id(exporter):
    with trace.get_tracer("test").start_as_current_span("logged") as s:
        line = JsonFormatter().format(logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None))
    assert json.loads(line)["trace_id"] == format(s.get_span_context().trace_id, "032x")
    outside = JsonFormatter().format(logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None))
    assert json.loads(outside)["trace_id"] == "-"


@pytest.mark.parametrize("env,expect", [({}, "False"), ({"OTEL_TRACES_EXPORTER": "console"}, "True"),
                                        ({"OTEL_TRACES_EXPORTER": "none"}, "False"),
                                        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "ValueError")])
def test_tracing_is_off_unless_the_environment_configures_it(env, expect):
    import os
    import subprocess
    import sys

    code = ("from adjointdpm_server.telemetry import tracing\n"
            "try:\n    print(tracing.configure_from_env())\nexcept ValueError:\n    print('ValueError')\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip().splitlines()[-1] == expect, out.stderr[-2000:]


def test_the_readme_trace_snippet(exporter, tmp_path):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = re.search(r"<!-- trace-snippet[^>]*-->\n```python\n(.*?)```", text, re.S).group(1)
    srv = build_server(ServerConfig(models=("digits",), port=0, artifact_dir=tmp_path / "a"))
    try:
        with adjointdpm.Client(f"127.0.0.1:{srv.port}", timeout=120) as client:
            exporter.clear()
            exec(code, {"client": client})
    finally:
        srv.stop(0)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["adjointdpm/Sample"].parent.span_id == spans["stylize"].context.span_id
