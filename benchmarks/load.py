"""Continuous batching, measured: throughput and latency with the engine's batching on and off,
side by side in one run, and a well-behaved caller's latency next to a hostile one.

Two fresh server subprocesses on loopback, identical but for ``--batch-window-ms`` (``--window``
ms: batching on; ``0``: every network call runs alone — the baseline), both with
``--max-active-jobs 32 --max-queue 64`` and ``OMP_NUM_THREADS`` = ``--server-threads``. For each
workload and each C in ``--concurrency`` (1/4/16/32), C client threads (each its own
``adjointdpm.Client``) send ⌈requests / C⌉ requests back to back; the cells of the two servers
run interleaved (off, on, then on, off for the next C), so drifting load on a shared machine hits
both alike. Per cell: requests/s (requests / wall time from the start barrier to the last result)
and the latency percentiles the callers saw.

Workloads (digits model, server defaults: dpm3, CFG 2, grad_mode auto): ``sample-1`` =
``sample(labels=k, batch=1, steps)``; ``sample-8`` = batch 8; ``gradient`` =
``compute_gradient(ServerLoss("classifier", {"label": 8}), labels=3, batch=1, steps)``;
``gradient-checkpoint`` = the same with ``grad_mode="checkpoint"`` (``auto`` keeps graphs only
when a job runs alone on a batching server, so the two differ under load and with batching off);
``client-loss`` = the same gradient with a client-side numpy loss (one round trip to the client).

Hostile caller: per server, the p50 of a well-behaved caller's batch-1 Samples alone, then while
another caller holds 8 ComputeGradient streams whose client-loss queries it never answers.

    python benchmarks/load.py                       # ~10 min on 2 cores; writes results/load.md
    python benchmarks/load.py --requests 8 --concurrency 1 4 --workloads sample-1 --out /tmp/l.md
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from _common import Cell, launch_server, machine, run_clients, stop_process, write_report

RESULTS = Path(__file__).resolve().parent / "results" / "load.md"
WORKLOADS = ("sample-1", "sample-8", "gradient", "gradient-checkpoint", "client-loss")
TITLES = {"sample-1": "Sample, batch 1", "sample-8": "Sample, batch 8",
          "gradient": "ComputeGradient, batch 1, server-side loss",
          "gradient-checkpoint": "ComputeGradient, batch 1, server-side loss, grad_mode checkpoint",
          "client-loss": "ComputeGradient, batch 1, client-side loss"}
GOALS = {"sample-1": 4.0, "gradient": 2.5, "gradient-checkpoint": 2.5}  # throughput ×, batching on vs off, at 16 clients


def darker(x: np.ndarray):
    """A client-side numpy loss: the mean intensity, with its gradient."""
    return float(x.mean()), np.full_like(x, 1.0 / x.size)


def request(client, workload: str, seed: int, steps: int):
    import adjointdpm

    if workload.startswith("sample"):
        batch = int(workload.split("-")[1])
        return client.sample(labels=[(seed + k) % 10 for k in range(batch)], batch=batch,
                             steps=steps, seed=seed)
    loss = (adjointdpm.ServerLoss("classifier", {"label": 8}) if workload.startswith("gradient")
            else adjointdpm.ClientLoss(darker, name="darker", autograd=False))
    mode = {"gradient-checkpoint": "checkpoint"}.get(workload, "")  # "": the server's default
    return client.compute_gradient(loss, labels=3, batch=1, steps=steps, seed=seed, grad_mode=mode)


class ServerProcess:
    def __init__(self, window_ms: float, threads: int, tmp: Path, name: str):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.window_ms = window_ms
        self.proc, self.log, self.target, _ = launch_server(
            ["--model", "digits", "--port", "0", "--max-active-jobs", "32", "--max-queue", "64",
             "--batch-window-ms", str(window_ms), "--artifact-dir", str(tmp / f"{name}-artifacts"),
             "--log-format", "text"], tmp / f"{name}.log", env)

    def stop(self) -> None:
        stop_process(self.proc, self.log)


def run_cell(target: str, workload: str, clients: int, per_client: int, steps: int) -> Cell:
    return run_clients(target, clients, per_client,
                       lambda client, k, j: request(client, workload, 1000 * k + j, steps), Cell())


def pct(values, q) -> float:
    return 1e3 * float(np.percentile(np.asarray(values), q)) if len(values) else float("nan")


class SilentStream:
    """A ComputeGradient stream whose client-loss query is never answered (stream kept open)."""

    def __init__(self, channel):
        from adjointdpm.v1 import adjointdpm_pb2 as pb
        from adjointdpm.v1 import adjointdpm_pb2_grpc as pb_grpc

        self.hold, self.asked = threading.Event(), threading.Event()
        req = pb.GradientSpec(generation=pb.Generation(labels=[1], seed=0, steps=10),
                                 losses=[pb.LossTerm(client="never", weight=1.0)])

        def requests():
            yield pb.ComputeGradientRequest(spec=req)
            self.hold.wait()

        self.call = pb_grpc.AdjointDPMServiceStub(channel).ComputeGradient(requests())
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for event in self.call:
                if event.WhichOneof("kind") == "loss_query":
                    self.asked.set()
        except Exception:  # noqa: BLE001 — cancelled at the end
            pass

    def close(self):
        self.call.cancel()
        self.hold.set()


def hostile(target: str, steps: int, n: int = 12) -> tuple[float, float]:
    """p50 (ms) of a caller's batch-1 Samples alone, then beside 8 silent gradient streams."""
    import adjointdpm
    import grpc

    with adjointdpm.Client(target) as good:
        def p50():
            times = []
            for k in range(n):
                t0 = time.perf_counter()
                request(good, "sample-1", k, steps)
                times.append(time.perf_counter() - t0)
            return pct(times, 50)

        p50()  # warm-up
        alone = p50()
        with grpc.insecure_channel(target) as channel:
            streams = [SilentStream(channel) for _ in range(8)]
            if not all(s.asked.wait(60) for s in streams):
                raise RuntimeError("the silent streams were never asked")
            beside = p50()
            for s in streams:
                s.close()
    return alone, beside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16, 32])
    parser.add_argument("--requests", type=int, default=32,
                        help="requests per cell at least (each of C clients sends ⌈requests / C⌉, ≥ 2)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--window", type=float, default=5.0, help="--batch-window-ms when batching is on")
    parser.add_argument("--server-threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    import grpc
    import torch

    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t_start, load0 = time.perf_counter(), os.getloadavg()[0]
    cells: dict = {}
    settings = {"off": 0.0, "on": args.window}
    with tempfile.TemporaryDirectory(prefix="adjointdpm-load-") as tmpdir:
        servers = {s: ServerProcess(w, args.server_threads, Path(tmpdir), s) for s, w in settings.items()}
        try:
            for w in args.workloads:
                for s in servers.values():  # warm-up: lazy set-up of each kind of call
                    run_cell(s.target, w, 1, 2, args.steps)
                print(f"\n{TITLES[w]}", flush=True)
                for i, c in enumerate(args.concurrency):
                    per = max(2, math.ceil(args.requests / c))
                    order = ("off", "on") if i % 2 == 0 else ("on", "off")
                    for s in order:
                        cell = cells[(w, c, s)] = run_cell(servers[s].target, w, c, per, args.steps)
                        print(f"  C={c:<3} batching {s:<3}: {cell.rate:7.2f} req/s  p50 "
                              f"{pct(cell.latencies, 50):7.0f} ms  p95 {pct(cell.latencies, 95):7.0f} ms"
                              + (f"  ({len(cell.errors)} failed: {cell.errors[0]})" if cell.errors else ""),
                              flush=True)
            hostile_ms = {}
            for s in ("off", "on"):
                hostile_ms[s] = hostile(servers[s].target, args.steps)
                print(f"hostile, batching {s}: alone p50 {hostile_ms[s][0]:.0f} ms, beside 8 silent "
                      f"streams {hostile_ms[s][1]:.0f} ms", flush=True)
        finally:
            for s in servers.values():
                s.stop()
    total = time.perf_counter() - t_start
    lines = [
        "# Load: continuous batching on and off, side by side",
        "",
        f"- Command: `{' '.join(['python', 'benchmarks/load.py'] + sys.argv[1:])}`",
        f"- Date: {started}; total {total / 60:.1f} min; load average at start / end "
        f"{load0:.2f} / {os.getloadavg()[0]:.2f}",
        f"- Machine: {machine()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"grpcio {grpc.__version__}; device: CPU",
        (f"- Servers: two fresh subprocesses `python -m adjointdpm_server --model digits "
         f"--max-active-jobs 32 --max-queue 64 --batch-window-ms W` with W = {args.window:g} "
         f"(batching **on**) and W = 0 (**off**: every network call alone), "
         f"`OMP_NUM_THREADS={args.server_threads}`; cells interleaved between the two"),
        (f"- Clients: C threads, each its own `adjointdpm.Client`, ⌈{args.requests} / C⌉ (≥ 2) "
         f"requests back to back; digits model, {args.steps} steps, server defaults (dpm3, CFG 2, "
         "grad_mode auto). Throughput = requests / wall time; latency as the caller sees it."),
        "",
    ]
    for w in args.workloads:
        lines += [f"## {TITLES[w]}", "",
                  "| clients | off req/s | on req/s | on / off | off p50 ms | on p50 ms | "
                  "off p95 ms | on p95 ms |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in args.concurrency:
            off, on = cells[(w, c, "off")], cells[(w, c, "on")]
            failed = sum(len(x.errors) for x in (off, on))
            lines.append(f"| {c} | {off.rate:.2f} | {on.rate:.2f} | **{on.rate / off.rate:.2f}×** | "
                         f"{pct(off.latencies, 50):.0f} | {pct(on.latencies, 50):.0f} | "
                         f"{pct(off.latencies, 95):.0f} | {pct(on.latencies, 95):.0f} |"
                         + (f" {failed} failed" if failed else ""))
        lines.append("")
    lines += ["## A well-behaved caller beside a hostile one", "",
              "p50 of 12 sequential batch-1 Samples, alone and while another caller holds 8 "
              "ComputeGradient streams whose client-loss queries it never answers.", "",
              "| batching | alone p50 ms | beside 8 silent streams p50 ms | ratio |",
              "|---|---:|---:|---:|"]
    for s in ("off", "on"):
        a, b = hostile_ms[s]
        lines.append(f"| {s} | {a:.0f} | {b:.0f} | {b / a:.2f} |")
    lines += ["", "## Against the goals", ""]
    for w, goal in GOALS.items():
        if w in args.workloads and 16 in args.concurrency:
            r = cells[(w, 16, "on")].rate / cells[(w, 16, "off")].rate
            lines.append(f"- {TITLES[w]}, 16 clients: {r:.2f}× the throughput of batching off "
                         f"(goal ≥ {goal:g}×): {'met' if r >= goal else 'missed'}")
    if 1 in args.concurrency:
        for w in args.workloads:
            r = pct(cells[(w, 1, "on")].latencies, 50) / pct(cells[(w, 1, "off")].latencies, 50)
            lines.append(f"- {TITLES[w]}, one client: p50 {r:.2f}× unbatched (goal ≤ 1.1×): "
                         f"{'met' if r <= 1.1 else 'missed'}")
    a, b = hostile_ms["on"]
    lines.append(f"- Well-behaved caller beside 8 silent streams: p50 {b / a:.2f}× its p50 alone "
                 f"(goal ≤ 1.2×): {'met' if b / a <= 1.2 else 'missed'}")
    text = "\n".join(lines) + "\n"
    write_report(args.out, text)


if __name__ == "__main__":
    main()
