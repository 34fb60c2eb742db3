"""Prometheus metrics on their own HTTP port, named in the style of Triton/TGI.

One registry per server (tests run several in one process). Requests by RPC and status,
latency and queue-time histograms, network evaluations by phase (forward sampling vs the
backward/adjoint pass), running and queued jobs, peak accelerator memory.
"""

from __future__ import annotations

import resource

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["Metrics"]

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
        self.jobs_running = Gauge("adjointdpm_jobs_running", "jobs holding a GPU slot", registry=r)
        self.jobs_queued = Gauge("adjointdpm_jobs_queued", "jobs waiting for a slot", registry=r)
        self.memory_peak = Gauge("adjointdpm_accelerator_memory_peak_bytes",
                                 "peak accelerator memory allocated by torch (CPU: peak RSS)",
                                 ["device"], registry=r)
        self.memory_peak.labels(device=device).set_function(lambda: _peak_memory_bytes(device))
        self._http = None

    def watch(self, scheduler) -> None:
        """Running and queued jobs are read from the scheduler at scrape time."""
        self.jobs_running.set_function(lambda: scheduler.running)
        self.jobs_queued.set_function(lambda: scheduler.queued)

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
