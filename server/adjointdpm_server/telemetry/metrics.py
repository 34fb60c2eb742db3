"""Prometheus metrics on their own HTTP port, named in the style of Triton/TGI.

One registry per server (tests run several in one process). Requests by RPC and status,
latency and queue-time histograms, network evaluations by phase (forward sampling vs the
backward/adjoint pass), running and queued jobs, peak accelerator memory; per tenant (the
caller the fair share counts: ``tenant:NAME``, or ``peer:HOST`` when auth is off) its queued,
running and parked jobs and the device seconds its network calls took.
"""

from __future__ import annotations

import resource

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

__all__ = ["Metrics"]

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


def _peak_memory_bytes(device: str) -> float:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return float(torch.cuda.max_memory_allocated())
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # CPU: peak RSS


class Metrics:
    def __init__(self, device: str = "cpu"):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("adjointdpm_requests", "RPCs finished, by method and status code",
                                ["rpc", "code"], registry=r)
        self.latency = Histogram("adjointdpm_request_duration_seconds", "time from call to last message",
                                 ["rpc"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("adjointdpm_queue_duration_seconds", "time a job waited for a slot",
                                    ["rpc"], buckets=LATENCY_BUCKETS, registry=r)
        self.nfe = Counter("adjointdpm_nfe", "network function evaluations, by phase "
                           "(forward: sampling; backward: the gradient pass — adjoint or checkpoint)",
                           ["phase"], registry=r)
        self.jobs_running = Gauge("adjointdpm_jobs_running", "jobs admitted (states in memory: "
                                  "holding a slot, or parked on a client's reply)", registry=r)
        self.jobs_queued = Gauge("adjointdpm_jobs_queued", "jobs waiting to be admitted", registry=r)
        self.jobs_active = Gauge("adjointdpm_jobs_active", "admitted jobs running on the engine",
                                 registry=r)
        self.jobs_waiting_client = Gauge("adjointdpm_jobs_waiting_client",
                                         "active jobs parked on a client's loss reply", registry=r)
        self.network_batch = Histogram("adjointdpm_network_batch_size",
                                       "samples per network call (forward: sampling; vjp: backward)",
                                       ["model", "kind"], buckets=BATCH_BUCKETS, registry=r)
        self.network_calls = Counter("adjointdpm_network_calls", "network calls run by the engine",
                                     ["model", "kind"], registry=r)
        self.memory_peak = Gauge("adjointdpm_accelerator_memory_peak_bytes",
                                 "peak accelerator memory allocated by torch (CPU: peak RSS)",
                                 ["device"], registry=r)
        self.memory_peak.labels(device=device).set_function(lambda: _peak_memory_bytes(device))
        self._http = None

    def watch(self, admission, engine) -> None:
        """Job gauges are read from the admission queue and the engine at scrape time; the engine
        reports each network call it runs."""
        self.jobs_running.set_function(lambda: admission.running + admission.parked_jobs)
        self.jobs_queued.set_function(lambda: admission.queued)
        self.jobs_active.set_function(lambda: engine.active)
        self.jobs_waiting_client.set_function(lambda: engine.waiting_client)
        engine.observer = self.observe_network_call
        self.registry.register(_TenantCollector(admission, engine))

    def watch_cluster(self, cluster) -> None:
        """The coordination store as this replica sees it (a ``cluster.Coordination``)."""
        self.registry.register(_ClusterCollector(cluster))

    def watch_banks(self, banks) -> None:
        """Each model's adapter bank (``{model: AdapterBank}``), read at scrape time."""
        self.registry.register(_BankCollector(banks))

    def observe_network_call(self, model: str, kind: str, rows: int) -> None:
        kind = "vjp" if kind == "vjp" else "forward"  # a solo call builds a graph: a forward
        self.network_batch.labels(model=model, kind=kind).observe(rows)
        self.network_calls.labels(model=model, kind=kind).inc()

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Expose /metrics on ``port`` (0 = any free port); returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_address[1]

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _ClusterCollector:
    """``adjointdpm_coordination_up`` (the last lease renewal reached the store: alert on 0) and
    what this replica holds there, by kind."""

    def __init__(self, cluster):
        self.cluster = cluster

    def describe(self):
        return []

    def collect(self):
        up = GaugeMetricFamily("adjointdpm_coordination_up", "1 when this replica's last lease renewal "
                               "reached the coordination store", labels=["store"])
        up.add_metric([self.cluster.url], 1.0 if self.cluster.reachable else 0.0)
        yield up
        held = GaugeMetricFamily("adjointdpm_coordination_held", "what this replica holds in the "
                                 "coordination store, by kind", labels=["kind"])
        for kind, count in self.cluster.held_here().items():
            held.add_metric([kind], float(count))
        yield held


class _TenantCollector:
    """Per-caller gauges read at scrape time: only callers with jobs now (their jobs) or ever
    served (their device seconds, kept for at most the engine's bounded set of callers)."""

    def __init__(self, admission, engine):
        self.admission, self.engine = admission, engine

    def describe(self):
        return []  # collected at scrape time only (labels come and go)

    def collect(self):
        jobs = GaugeMetricFamily("adjointdpm_tenant_jobs", "a tenant's jobs by state (queued: "
                                 "waiting for a slot; running: holding one; parked: waiting for "
                                 "its client without one)", labels=["tenant", "state"])
        for caller, load in sorted(self.admission.load().items()):
            for state in ("queued", "running", "parked"):
                jobs.add_metric([caller, state], getattr(load, state))
        yield jobs
        work = CounterMetricFamily("adjointdpm_tenant_device_seconds", "device time of a "
                                   "tenant's network calls (its rows' share of each call)",
                                   labels=["tenant"])
        for caller, seconds in sorted(self.engine.work_by_caller().items()):
            work.add_metric([caller], seconds)
        yield work


DISTINCT_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64)


class _BankCollector:
    """The adapter banks: bytes against the budget, adapters resident, hits, misses, evictions,
    load time, calls by distinct adapters in them, mixed calls that fell back."""

    def __init__(self, banks):
        self.banks = banks

    def describe(self):
        return []

    def collect(self):
        gauges = [("adapter_bank_bytes", "bytes of LoRA adapters resident", lambda b: b.nbytes),
                  ("adapter_bank_budget_bytes", "the bank's budget (--adapter-cache-mib)", lambda b: b.budget),
                  ("adapters_resident", "LoRA adapters resident (loaded and trained ones)", lambda b: b.resident)]
        counters = [("adapter_bank_hits", "adapter lookups served from the bank", "hits"),
                    ("adapter_bank_misses", "adapters loaded from the artifact store", "misses"),
                    ("adapter_bank_evictions", "unused adapters evicted for room", "evictions"),
                    ("adapter_load_seconds", "time spent loading adapters", "load_seconds"),
                    ("adapter_mixed_fallbacks", "mixed-adapter calls a network could not run "
                     "(its adapters run in separate calls since)", "fallbacks")]
        for name, doc, read in gauges:
            family = GaugeMetricFamily(f"adjointdpm_{name}", doc, labels=["model"])
            for model, bank in sorted(self.banks.items()):
                family.add_metric([model], read(bank))
            yield family
        for name, doc, attr in counters:
            family = CounterMetricFamily(f"adjointdpm_{name}", doc, labels=["model"])
            for model, bank in sorted(self.banks.items()):
                family.add_metric([model], getattr(bank.stats, attr))
            yield family
        family = HistogramMetricFamily("adjointdpm_adapter_batch_distinct", "distinct LoRA adapters "
                                       "in each network call of a bank (0: base rows only)", labels=["model"])
        for model, bank in sorted(self.banks.items()):
            seen = dict(bank.stats.distinct)
            buckets = [(str(float(le)), sum(n for d, n in seen.items() if d <= le)) for le in DISTINCT_BUCKETS]
            buckets.append(("+Inf", sum(seen.values())))
            family.add_metric([model], buckets, sum(d * n for d, n in seen.items()))
        yield family
