"""deploy/monitoring/: the Grafana dashboard and the PrometheusRule alerts refer only to metrics,
and labels, that a live server exports on /metrics (promtool does not install offline here, so
each PromQL expression is checked structurally: balanced brackets, durations, and its metric and
label names against a scrape after real calls)."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
import yaml

import adjointdpm
from adjointdpm_server.config import ServerConfig
from adjointdpm_server.wire import build_server

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
METRIC = re.compile(r"\badjointdpm_[a-z_]+\b")
GROUPING = re.compile(r"\b(?:by|without|ignoring|on)\s*\(([^)]*)\)")
MATCHERS = re.compile(r"(adjointdpm_[a-z_]+)\{([^}]*)\}")
EXTERNAL_LABELS = {"pod", "instance", "job", "namespace"}  # added by Prometheus to every series


def _dashboard():
    return json.loads((MONITORING / "grafana-dashboard.json").read_text())


def _rules():
    return yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())


def _expressions() -> list[str]:
    exprs = [t["expr"] for p in _dashboard()["panels"] for t in p["targets"]]
    exprs += [r["expr"] for g in _rules()["spec"]["groups"] for r in g["rules"]]
    return exprs


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{sample name: set of label names} from /metrics after sampling, a gradient and an error."""
    srv = build_server(ServerConfig(models=("digits",), port=0, metrics_port=0,
                                    artifact_dir=tmp_path_factory.mktemp("artifacts")))
    try:
        with adjointdpm.Client(f"127.0.0.1:{srv.port}", timeout=120) as client:
            client.sample(labels=1, seed=0, steps=3)
            client.compute_gradient(adjointdpm.ServerLoss("classifier", {"label": 2}), labels=1, seed=0,
                                    steps=3, grad_mode="checkpoint")
            with pytest.raises(adjointdpm.AdjointDPMError):
                client.sample(model="nope")
        text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
    finally:
        srv.stop(0)
    names: dict[str, set[str]] = {}
    for line in text.splitlines():
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s", line)
        if m and not line.startswith("#"):
            labels = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)=", m.group(3) or ""))
            names.setdefault(m.group(1), set()).update(labels)
    return names


def test_every_expression_names_exported_metrics_and_labels(exported):
    exprs = _expressions()
    assert len(exprs) >= 12
    for expr in exprs:
        metrics = METRIC.findall(expr)
        assert metrics, expr
        missing = [m for m in metrics if m not in exported]
        assert not missing, f"{missing} not exported; in {expr}"
        labels = set().union(*(exported[m] for m in metrics)) | EXTERNAL_LABELS
        for group in GROUPING.findall(expr):
            for label in filter(None, (s.strip() for s in group.split(","))):
                assert label in labels, f"label {label!r} of {expr}"
        for metric, matchers in MATCHERS.findall(expr):
            for label in re.findall(r"([a-zA-Z_]+)\s*(?:=~|!~|!=|=)", matchers):
                assert label in exported[metric] | EXTERNAL_LABELS, f"{metric}{{{label}}} in {expr}"


def test_expressions_are_well_formed():
    for expr in _expressions():
        depth = 0
        for ch in expr:
            depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
            assert depth >= 0, expr
        assert depth == 0, expr
        for window in re.findall(r"\[([^\]]*)\]", expr):
            assert re.fullmatch(r"\d+[smhd]", window), expr
        for fn in re.findall(r"\b([a-z_]+)\s*\(", expr):
            assert fn in {"sum", "max", "rate", "histogram_quantile", "by", "ignoring", "on", "without",
                          "group_left"}, f"unexpected function {fn} in {expr}"


def test_dashboard_panels():
    dash = _dashboard()
    assert dash["uid"] and dash["title"]
    variables = {v["name"] for v in dash["templating"]["list"]}
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["type"] == "timeseries" and p["title"]
        assert p["datasource"]["uid"].strip("${}") in variables
        pos = p["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs))
    text = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    # what the issue asks to see: queue depth, p95 per RPC, errors by code, batch size, memory peak
    for needed in ("adjointdpm_jobs_queued", "adjointdpm_request_duration_seconds_bucket",
                   "adjointdpm_requests_total", "adjointdpm_network_batch_size_sum",
                   "adjointdpm_accelerator_memory_peak_bytes"):
        assert needed in text


def test_rules_are_a_prometheusrule():
    doc = _rules()
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    rules = [r for g in doc["spec"]["groups"] for r in g["rules"]]
    assert len({r["alert"] for r in rules}) == len(rules) >= 4
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}
        assert re.fullmatch(r"\d+[smh]", r["for"])
        assert r["labels"]["severity"] in {"critical", "warning", "info"}
        assert r["annotations"]["summary"]


def _autoscaling_queries() -> tuple[set[str], list[str]]:
    """(metric names the production HPA asks for, PromQL queries of the KEDA ScaledObject)."""
    k8s = MONITORING.parent / "k8s" / "overlays"
    hpa = yaml.safe_load((k8s / "production" / "hpa.yaml").read_text())
    scaled = yaml.safe_load((k8s / "production-keda" / "scaledobject.yaml").read_text())
    names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    return names, [t["metadata"]["query"] for t in scaled["spec"]["triggers"]]


def test_autoscaling_metrics_are_exported(exported):
    """The production autoscalers (HPA through prometheus-adapter, KEDA's prometheus scaler) and the
    adapter rule name gauges a live server exports, with labels it (or Prometheus) attaches."""
    names, queries = _autoscaling_queries()
    assert "adjointdpm_jobs_queued" in names
    for name in names:
        assert name in exported, f"the HPA scales on {name}, which the server does not export"
    operator_labels = EXTERNAL_LABELS | {"service", "endpoint", "container"}  # ServiceMonitor's
    for query in queries:
        metrics = METRIC.findall(query)
        assert metrics and all(m in exported for m in metrics), query
        for metric, matchers in MATCHERS.findall(query):
            for label in re.findall(r"([a-zA-Z_]+)\s*(?:=~|!~|!=|=)", matchers):
                assert label in exported[metric] | operator_labels, f"{metric}{{{label}}}"
        depth = 0
        for ch in query:
            depth += {"(": 1, "{": 1, ")": -1, "}": -1}.get(ch, 0)
            assert depth >= 0, query
        assert depth == 0, query
    adapter = yaml.safe_load((MONITORING / "prometheus-adapter-values.yaml").read_text())
    for rule in adapter["rules"]["custom"]:
        pattern = re.search(r'__name__=~"\^?([^"$]+)\$?"', rule["seriesQuery"]).group(1)
        assert names <= {m for m in exported if re.fullmatch(pattern, m)}, rule["seriesQuery"]
