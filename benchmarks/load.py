"""Throughput and latency of the gRPC service under concurrent clients, and a call's overhead.

What is measured, against a real server on a loopback port:

- *Concurrency*: for C in (1, 4, 16) concurrent clients, C Python threads in this process, each
  with its own ``adjointdpm.Client`` (its own ``grpc.Channel``; ``--shared-client`` makes them
  share one — gRPC multiplexes calls over a channel), each issue N requests back to back
  (N = ⌈``--requests`` / C⌉). Per request: the latency the caller sees (call to result, queueing
  included); per cell: throughput = requests / wall time from the start barrier to the last
  result, in requests/s and samples/s (requests × batch). Every client makes one cheap
  ``ListModels`` call before the barrier, so connection set-up is not counted.
  The server is a **subprocess** (``python -m adjointdpm_server --model digits --port 0
  --max-concurrent-jobs K --max-queue 64``, ``OMP_NUM_THREADS`` = ``--server-threads``), so the
  client threads never compete for the server's GIL (they still compete for the cores). The
  server runs at most K jobs at once and queues the rest, so beyond C = K the latency grows
  about linearly with C while the throughput saturates. Each cell also reports the cores that
  *other* processes used meanwhile (``/proc/stat`` busy time minus this process's and the
  server's CPU time): the machine is shared, and a busy neighbour shows up there.
- *Overhead*: the same Sample and ComputeGradient work (same specs and seeds) done in this
  process with the server's task functions (``run_sample`` / ``run_gradient`` on a ``Runtime``
  with a ``LocalJob``) versus over gRPC with one client — to the subprocess server above, and to
  a server built in this process on the very same ``Runtime`` (``build_server(config,
  runtime)``, which isolates the gRPC layer: same model object, same thread setting). The three
  variants run interleaved, one repetition after another with a rotating order, and the medians
  are reported with the absolute difference (ms) and the ratio to in-process.

Workloads: ``sample`` (``Client.sample(labels=0…7, batch=8, steps=10)``), ``gradient``
(``compute_gradient(ServerLoss("classifier", {"label": 8}), labels=3, batch=4, steps=10)``:
∂L/∂x_T with a server-side loss) and ``client-loss`` (the same gradient with a client-side numpy
loss, ``ClientLoss(fn, autograd=False)`` returning ``(value, grad)``: one extra round trip, the
server sends the decoded images and waits for the answer). Solver, guidance (CFG 2) and grad
mode (``checkpoint``) are the server's defaults for ``digits``.

Threads: this process calls ``torch.set_num_threads(--server-threads)`` (default 1) for the
in-process runs and its in-process server; the subprocess gets ``OMP_NUM_THREADS`` and
``MKL_NUM_THREADS`` set to the same value. With K = 2 jobs × 1 thread the server fills exactly
the 2 cores of the reference machine.

    python benchmarks/load.py                     # ~3 min on 2 cores; writes results/load.md
    python benchmarks/load.py --requests 8 --concurrency 1 4 --overhead-reps 2 --out /tmp/l.md  # smoke
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "load.md"
WORKLOADS = ("sample", "gradient", "client-loss")
TITLES = {"sample": "Sample", "gradient": "ComputeGradient, server-side loss",
          "client-loss": "ComputeGradient, client-side loss"}


# -- the work ---------------------------------------------------------------------------------------
def darker(x: np.ndarray):
    """A client-side numpy loss: the mean intensity, with its gradient."""
    return float(x.mean()), np.full_like(x, 1.0 / x.size)


@dataclass
class Work:
    sample_batch: int
    grad_batch: int
    steps: int
    label: int = 3
    target_label: int = 8

    def batch(self, workload: str) -> int:
        return self.sample_batch if workload == "sample" else self.grad_batch

    def sample_labels(self) -> list[int]:
        return [k % 10 for k in range(self.sample_batch)]

    def grpc(self, client, workload: str, seed: int):
        import adjointdpm

        if workload == "sample":
            return client.sample(labels=self.sample_labels(), batch=self.sample_batch,
                                 steps=self.steps, seed=seed)
        if workload == "gradient":
            loss = adjointdpm.ServerLoss("classifier", {"label": self.target_label})
        else:
            loss = adjointdpm.ClientLoss(darker, name="darker", autograd=False)
        return client.compute_gradient(loss, labels=self.label, batch=self.grad_batch,
                                       steps=self.steps, seed=seed)

    def local(self, rt, workload: str, seed: int):
        from adjointdpm_server.tasks import (
            GenerationSpec,
            LocalJob,
            LossSpec,
            run_gradient,
            run_sample,
        )

        if workload == "sample":
            spec = GenerationSpec(labels=self.sample_labels(), batch=self.sample_batch,
                                  steps=self.steps, seed=seed)
            return run_sample(rt, spec, LocalJob())
        spec = GenerationSpec(labels=[self.label], batch=self.grad_batch, steps=self.steps, seed=seed)
        if workload == "gradient":
            loss = LossSpec("server", "classifier", params={"label": self.target_label})
            return run_gradient(rt, spec, [loss], LocalJob())
        return run_gradient(rt, spec, [LossSpec("client", "darker")], LocalJob({"darker": darker}))


# -- the server subprocess ------------------------------------------------------------------------
class ServerProcess:
    def __init__(self, max_jobs: int, threads: int, artifact_dir: Path, log_path: Path):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.log = open(log_path, "w")  # noqa: SIM115 — open as long as the child runs
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "adjointdpm_server", "--model", "digits", "--port", "0",
             "--max-concurrent-jobs", str(max_jobs), "--max-queue", "64",
             "--artifact-dir", str(artifact_dir), "--log-format", "text"],
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.stop()
            raise RuntimeError(f"the server did not start (first line {line!r}); see {log_path}")
        self.target = line.rsplit(" ", 1)[1].strip()
        # Keep draining stdout so the child can never block on a full pipe.
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: graceful drain, immediate when idle
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# -- other load on the machine --------------------------------------------------------------------
class CpuMeter:
    """CPU the whole machine spent (``/proc/stat``) minus what this process and the server child
    spent: the cores other work took from the benchmark during an interval (Linux only)."""

    def __init__(self, child_pid: int | None = None):
        self.child_pid, self.tick = child_pid, os.sysconf("SC_CLK_TCK")

    def _read(self):
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            busy = (v[0] + v[1] + v[2] + sum(v[5:8])) / self.tick  # user nice system irq softirq steal
            ours = sum(os.times()[:2])
            if self.child_pid is not None:
                with open(f"/proc/{self.child_pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                ours += (int(fields[11]) + int(fields[12])) / self.tick  # utime, stime
        except (OSError, ValueError, IndexError):
            return None
        return time.perf_counter(), busy, ours

    def start(self):
        self._t0 = self._read()
        return self

    def other_cores(self) -> float:
        """Average cores used by other processes since ``start()`` (nan where unknown)."""
        t1 = self._read()
        if self._t0 is None or t1 is None or t1[0] <= self._t0[0]:
            return float("nan")
        (w0, b0, o0), (w1, b1, o1) = self._t0, t1
        return max(0.0, ((b1 - b0) - (o1 - o0)) / (w1 - w0))


# -- concurrency --------------------------------------------------------------------------------------
@dataclass
class Cell:
    workload: str
    clients: int
    per_client: int
    latencies: list[float] = field(default_factory=list)
    wall: float = 0.0
    other_cores: float = float("nan")
    errors: list[str] = field(default_factory=list)

    @property
    def done(self) -> int:
        return len(self.latencies)


def run_cell(target: str, work: Work, workload: str, clients: int, per_client: int,
             shared: bool, meter: CpuMeter | None = None) -> Cell:
    import adjointdpm

    cell = Cell(workload, clients, per_client)
    shared_client = adjointdpm.Client(target) if shared else None
    pool = [shared_client or adjointdpm.Client(target) for _ in range(clients)]
    for c in {id(c): c for c in pool}.values():
        c.list_models()  # connect before the clock starts
    barrier = threading.Barrier(clients + 1)
    lock = threading.Lock()

    def worker(k: int) -> None:
        client = pool[k]
        barrier.wait()
        for j in range(per_client):
            t0 = time.perf_counter()
            try:
                work.grpc(client, workload, seed=1000 * k + j)
            except Exception as err:  # noqa: BLE001 — reported in the table
                with lock:
                    cell.errors.append(f"{type(err).__name__}: {err}")
                continue
            dt = time.perf_counter() - t0
            with lock:
                cell.latencies.append(dt)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    if meter is not None:
        meter.start()
    for t in threads:
        t.join()
    cell.wall = time.perf_counter() - t0
    if meter is not None:
        cell.other_cores = meter.other_cores()
    for c in {id(c): c for c in pool}.values():
        c.close()
    return cell


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values), q)) if len(values) else float("nan")


def cell_row(cell: Cell, batch: int) -> str:
    lat = [1e3 * v for v in cell.latencies]
    rps = cell.done / cell.wall if cell.wall else float("nan")
    errors = f" ({len(cell.errors)} failed)" if cell.errors else ""
    return (f"| {cell.clients} | {cell.per_client} | {cell.done}{errors} | {cell.wall:.2f} | "
            f"{rps:.2f} | {rps * batch:.1f} | {pct(lat, 50):.0f} | {pct(lat, 90):.0f} | "
            f"{pct(lat, 99):.0f} | {max(lat) if lat else float('nan'):.0f} | {cell.other_cores:.2f} |")


CELL_HEADER = [("| clients C | requests per client | requests | wall s | requests/s | samples/s | "
                "p50 ms | p90 ms | p99 ms | max ms | other load (cores) |"),
               "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]


# -- overhead -------------------------------------------------------------------------------------
def run_overhead(target: str, work: Work, workloads, reps: int, threads: int, tmp: Path):
    """The variants' names and the ms of every repetition per (workload, variant)."""
    import adjointdpm
    import torch
    from adjointdpm_server.config import ServerConfig
    from adjointdpm_server.runtime import Runtime
    from adjointdpm_server.server import build_server

    torch.set_num_threads(threads)
    config = ServerConfig(models=("digits",), port=0, artifact_dir=tmp / "inproc-artifacts",
                          max_concurrent_jobs=1, max_queue=64)
    rt = Runtime(config)
    server = build_server(config, runtime=rt)
    try:
        remote = adjointdpm.Client(target)
        local_grpc = adjointdpm.Client(f"127.0.0.1:{server.port}")
        variants = {
            "in-process": lambda w, s: work.local(rt, w, s),
            "gRPC, subprocess server": lambda w, s: work.grpc(remote, w, s),
            "gRPC, in-process server": lambda w, s: work.grpc(local_grpc, w, s),
        }
        names = list(variants)
        for w in workloads:  # warm-up: lazy initialisation, connections
            for fn in variants.values():
                fn(w, 10**6)
        times = {(w, v): [] for w in workloads for v in names}
        for r in range(reps):
            for w in workloads:
                order = names[r % len(names):] + names[:r % len(names)]
                for v in order:
                    t0 = time.perf_counter()
                    variants[v](w, r)  # the same seed for every variant: identical work
                    times[(w, v)].append(time.perf_counter() - t0)
            print(f"  overhead repetition {r + 1}/{reps}", flush=True)
        remote.close()
        local_grpc.close()
    finally:
        server.stop(1.0)
    return names, {k: 1e3 * np.asarray(v) for k, v in times.items()}


# -- report ---------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "python": platform.python_version()}


def rate(cell: Cell) -> float:
    return cell.done / cell.wall if cell.wall and cell.done else float("nan")


def interpretation(cells: dict, overhead, args, overhead_other: float) -> list[str]:
    """Two or three sentences, their numbers taken from this run."""
    out, ws, cs = [], list(args.workloads), sorted(args.concurrency)
    k = args.max_concurrent_jobs
    join = lambda xs: " / ".join(xs)
    if len(cs) >= 2:
        lo, hi = cs[0], cs[-1]
        mid = next((c for c in cs if c >= k and c != lo), hi)
        text = (f"The server runs at most K = {k} jobs at once ({args.server_threads} torch thread each) "
                f"and queues the rest, so throughput saturates: for {join(ws)} it rises "
                f"×{join(f'{rate(cells[(w, mid)]) / rate(cells[(w, lo)]):.2f}' for w in ws)} from "
                f"C = {lo} to C = {mid} (ideal ×{min(k, mid) / min(k, lo):g})")
        if mid != hi:
            text += (f" and changes ×{join(f'{rate(cells[(w, hi)]) / rate(cells[(w, mid)]):.2f}' for w in ws)} "
                     f"from C = {mid} to C = {hi}")
        text += (f", while the extra clients only wait in the queue: the median latency at C = {hi} "
                 f"is {join(f'{pct(cells[(w, hi)].latencies, 50) * 1e3:.0f}' for w in ws)} ms "
                 f"against {join(f'{pct(cells[(w, lo)].latencies, 50) * 1e3:.0f}' for w in ws)} ms "
                 f"at C = {lo}.")
        busiest = max(cells.values(), key=lambda c: -1.0 if math.isnan(c.other_cores) else c.other_cores)
        if busiest.other_cores > 0.2:
            text += (f" Other processes took up to {busiest.other_cores:.2f} cores during a cell "
                     f"({busiest.workload}, C = {busiest.clients}; see the last column), so the "
                     "throughput figures of such cells understate what the server does on an idle "
                     "machine.")
        out.append(text)
    if overhead is not None:
        names, raw = overhead
        base = {w: raw[(w, names[0])] for w in ws}
        d = {(w, n): raw[(w, n)] - base[w] for w in ws for n in names[1:]}
        sub, inp = names[1], names[2]
        worst = max(abs(float(np.median(v))) / float(np.median(base[w])) for (w, _), v in d.items())
        out.append(
            f"Over gRPC the same work costs {join(f'{np.median(d[(w, sub)]):+.0f}' for w in ws)} ms "
            f"(paired medians; {join(f'{np.median(raw[(w, sub)]) / np.median(base[w]):.3f}' for w in ws)}× "
            f"in-process) with the subprocess server and "
            f"{join(f'{np.median(d[(w, inp)]):+.0f}' for w in ws)} ms with a server in this process "
            f"on the same Runtime, against {min(np.median(b) for b in base.values()):.0f}–"
            f"{max(np.median(b) for b in base.values()):.0f} ms of compute: at most "
            f"{100 * worst:.1f}% of the in-process time (compare the interquartile ranges of the "
            f"paired differences for the run-to-run noise).")
        if "gradient" in ws and "client-loss" in ws:
            extra = {n: np.median(d[("client-loss", n)] - d[("gradient", n)]) for n in names[1:]}
            out.append(f"The client-side loss's round trip (the server sends the {args.grad_batch} "
                       f"decoded images, the client answers value and gradient) adds "
                       f"{extra[sub]:+.1f} ms (subprocess server) / {extra[inp]:+.1f} ms (in-process "
                       f"server) over the server-side loss's overhead (median of the per-repetition "
                       f"differences of the two overheads).")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=32,
                        help="requests per cell (each of C clients sends ⌈requests / C⌉)")
    parser.add_argument("--max-concurrent-jobs", type=int, default=2, help="the server's K")
    parser.add_argument("--server-threads", type=int, default=1,
                        help="torch threads: OMP_NUM_THREADS of the server, set_num_threads here")
    parser.add_argument("--sample-batch", type=int, default=8)
    parser.add_argument("--grad-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--overhead-reps", type=int, default=7, help="0 = skip the overhead part")
    parser.add_argument("--shared-client", action="store_true",
                        help="all threads share one Client (one channel) instead of one each")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    work = Work(args.sample_batch, args.grad_batch, args.steps)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.server_threads))
    import grpc
    import torch

    torch.set_num_threads(args.server_threads)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load0, t_start = os.getloadavg()[0], time.perf_counter()
    cells: dict = {}
    with tempfile.TemporaryDirectory(prefix="adjointdpm-load-") as tmpdir:
        tmp = Path(tmpdir)
        t0 = time.perf_counter()
        server = ServerProcess(args.max_concurrent_jobs, args.server_threads, tmp / "artifacts",
                               tmp / "server.log")
        startup = time.perf_counter() - t0
        print(f"server subprocess on {server.target} (started in {startup:.1f} s)", flush=True)
        try:
            for w in args.workloads:  # warm-up: the first call of each kind pays lazy set-up
                run_cell(server.target, work, w, 1, 2, False)
            for w in args.workloads:
                print(f"\n{TITLES[w]} (batch {work.batch(w)}, {work.steps} steps)")
                print("\n".join(CELL_HEADER), flush=True)
                for c in args.concurrency:
                    per = max(1, math.ceil(args.requests / c))
                    cell = run_cell(server.target, work, w, c, per, args.shared_client,
                                    CpuMeter(server.proc.pid))
                    cells[(w, c)] = cell
                    print(cell_row(cell, work.batch(w)), flush=True)
                    for e in sorted(set(cell.errors))[:3]:
                        print(f"   error: {e}", flush=True)
            overhead, overhead_other = None, float("nan")
            if args.overhead_reps > 0:
                print(f"\noverhead: {args.overhead_reps} interleaved repetitions", flush=True)
                meter = CpuMeter(server.proc.pid).start()
                overhead = run_overhead(server.target, work, args.workloads, args.overhead_reps,
                                        args.server_threads, tmp)
                overhead_other = meter.other_cores()
        finally:
            server.stop()
    total = time.perf_counter() - t_start
    load1 = os.getloadavg()[0]

    m = machine()
    cmd = " ".join(["python", "benchmarks/load.py"] + sys.argv[1:])
    lines = [
        "# Load: throughput, latency percentiles and gRPC overhead",
        "",
        f"- Command: `{cmd}`",
        f"- Date: {started} (total runtime {total / 60:.1f} min; server start-up {startup:.1f} s)",
        (f"- Machine: {m['cpu']}, {m['cores']} cores ({m['affinity']} usable), Python {m['python']}, "
         f"torch {torch.__version__}, grpcio {grpc.__version__}; load average at start / end: "
         f"{load0:.2f} / {load1:.2f}"),
        (f"- Torch threads: server subprocess `OMP_NUM_THREADS={args.server_threads}` "
         f"(and `MKL_NUM_THREADS`); this process `torch.set_num_threads({args.server_threads})` "
         "(in-process runs and the in-process server)"),
        ("- Server: subprocess `python -m adjointdpm_server --model digits --port 0 "
         f"--max-concurrent-jobs {args.max_concurrent_jobs} --max-queue 64 --log-format text` on "
         f"127.0.0.1 (plaintext, no auth): at most K = {args.max_concurrent_jobs} jobs run at once, "
         "the rest wait in its queue"),
        ("- Clients: C threads in the benchmark process, "
         + ("all sharing one `adjointdpm.Client` (one channel)" if args.shared_client else
            "each with its own `adjointdpm.Client` (own channel; gRPC core may still share one TCP "
            "connection between channels with identical arguments)")
         + f", each sending ⌈{args.requests} / C⌉ requests back to back; one `ListModels` per "
         "client before the start barrier; one warm-up cell per workload beforehand"),
        ("- Workloads (model `digits`, 8×8 images, server defaults for solver, CFG 2 and grad mode "
         f"`checkpoint`): `sample` = `sample(labels=0…{work.sample_batch - 1}, "
         f"batch={work.sample_batch}, steps={work.steps}, seed=s)`; `gradient` = "
         f"`compute_gradient(ServerLoss(\"classifier\", {{\"label\": {work.target_label}}}), "
         f"labels={work.label}, batch={work.grad_batch}, steps={work.steps}, seed=s)` (∂L/∂x_T); "
         "`client-loss` = the same with `ClientLoss(fn, autograd=False)`, fn = the mean intensity "
         "in numpy → `(value, grad)`"),
        ("- Latency: per request as the caller sees it (queueing included); throughput: requests "
         "done / wall time from the start barrier to the last result; samples/s = requests/s × "
         "batch. Percentiles by linear interpolation over one cell's requests — with ~32 requests "
         "p99 is essentially the maximum."),
        ("- Other load: the average number of cores that processes other than this benchmark and "
         "its server used during a cell (busy time in `/proc/stat` minus the CPU time of the two "
         f"processes); the machine is shared, and on {m['affinity']} cores anything above ~0.2 "
         "takes visible throughput away from the K server jobs."),
        "",
        "## Concurrency (subprocess server)",
        "",
    ]
    for w in args.workloads:
        lines += [f"### {TITLES[w]} — `{w}`, batch {work.batch(w)}, {work.steps} steps", ""]
        lines += CELL_HEADER
        lines += [cell_row(cells[(w, c)], work.batch(w)) for c in args.concurrency]
        errs = sorted({e for c in args.concurrency for e in cells[(w, c)].errors})
        lines += ["", f"Failed requests: {'; '.join(errs[:3])}", ""] if errs else [""]

    if overhead is not None:
        names, raw = overhead
        lines += [
            "## Overhead of a gRPC call over the same work in process",
            "",
            (f"{args.overhead_reps} interleaved repetitions (order rotating), 1 client, identical "
             "specs and seeds in every variant of a repetition. *In-process*: `run_sample` / "
             "`run_gradient` with a `LocalJob` on a `Runtime` in the benchmark process (the "
             "client-side loss is called directly; Sample encodes PNGs in both). *Subprocess*: the "
             "server of the tables above, idle otherwise. *In-process server*: `build_server(config, "
             "runtime)` on the same `Runtime` as in-process, over loopback gRPC — the same model "
             "object and threads, so only the gRPC layer (protobuf, the job scheduler and its "
             "threads, HTTP/2 on loopback, the client-loss round trip) differs. Δ = difference of "
             "the medians; paired Δ = median and interquartile range of the per-repetition "
             "differences (same seed, adjacent in time); ratio = median / in-process median. "
             f"Other load during this part: {overhead_other:.2f} cores."),
            "",
            "| workload | in-process ms | variant | gRPC ms | Δ ms | paired Δ ms [p25, p75] | ratio |",
            "|---|---:|---|---:|---:|---:|---:|",
        ]
        for w in args.workloads:
            base = raw[(w, names[0])]
            for n in names[1:]:
                t, d = raw[(w, n)], raw[(w, n)] - base
                lines.append(f"| {w} | {np.median(base):.1f} | {n.removeprefix('gRPC, ')} | "
                             f"{np.median(t):.1f} | {np.median(t) - np.median(base):+.1f} | "
                             f"{np.median(d):+.1f} [{pct(d, 25):+.1f}, {pct(d, 75):+.1f}] | "
                             f"{np.median(t) / np.median(base):.3f} |")
        lines.append("")

    lines += ["## Interpretation", ""]
    for paragraph in interpretation(cells, overhead, args, overhead_other):
        lines += [paragraph, ""]
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
