"""Multi-adapter batching, measured: many LoRA adapters of one model served in one network call
(``--multi-adapter-batching on``) against each adapter batching only with its own (``off``, the
previous batching rule), side by side in one run.

Adapters: before the servers start, ``--adapters`` (64) LoRA adapters of the digits model are
written straight into one artifact directory with the server's own ``ArtifactStore`` (kind
``lora``, the default tenant — the servers run without ``--tokens-file``, so every request is
the default tenant's and finds them), each rank ``--rank`` (4), alpha = rank, on the model's
``lora_targets``, its A and B drawn at random (peft's uniform ±1/√fan_in, one seed per adapter;
B scaled by ``--b-scale`` = 0.1 so the samples stay digits), named ``bench0``…``bench63``.

Servers: two fresh subprocesses ``python -m adjointdpm_server --model digits --port 0
--max-active-jobs 32 --max-queue 64 --batch-window-ms 5 --metrics-port 0 --artifact-dir DIR``
(the same DIR), identical but for ``--multi-adapter-batching on`` / ``off``, with
``OMP_NUM_THREADS`` = ``--server-threads`` (2). Before measuring, every adapter is used once on
each server (so the adapter banks hold all of them: steady state, not first loads) and each kind
of call is warmed up.

Cells: C client threads (each its own ``adjointdpm.Client``, connected before the clock starts)
send ``--requests`` requests each back to back; throughput = requests / wall time from the start
barrier to the last result, latency as the caller sees it; the server's /metrics give the mean
rows per network call over the cell (all kinds; a batch-1 request is 2 rows, CFG's cond and
uncond in one call). Workloads (digits model, server defaults: dpm3,
CFG 2, grad_mode auto — as benchmarks/load.py): ``sample`` = ``sample(labels=<a random digit>,
batch=1, steps=10)``; ``gradient`` = ``compute_gradient(ServerLoss("classifier", {"label": 8}),
labels=3, batch=1, steps=10)``. With 16 clients:

- (a) each client on its own adapter, batching on; (b) all 16 on one adapter, on;
  (c) all 16 on the base model (no adapter), on; (d) as (a) on the ``off`` server.
  Targets: (a)/(d) ≥ 3.5× throughput; (a)/(b) ≥ 0.85 (within 15% of one shared adapter).
- Distinct adapters D in 1, 2, 4, 8, 16, 64 (``sample`` only): request j of client k names
  adapter (k + 16·j) mod D — D ≤ 16: client k stays on adapter k mod D; D = 64: each client walks
  four adapters, all 64 in use — on both servers: the plot (throughput against D) and a table.
- One client alone: ``--alone`` sequential batch-1 Samples each on the base model and on one
  adapter, on both servers, the kinds of request taken in turn (rotated each round); target:
  p50 with batching on within 10% of off, for the base and for an adapter.

``off`` is the new code with mixing off (the same adapter bank, one adapter per call), not the
code before adapter banks. ``--today REV`` adds that too: a third server run from ``git archive
REV server`` (read-only; e.g. the commit before the bank), started with the same flags but
``--multi-adapter-batching`` (it has none), its adapters its own cached peft copies; it joins the
16-client cells as (e) = (a) on it, and the single-client ones, where the 10% target is then
also taken against it.

Drift on a shared machine: the main cells run in ``--rounds`` (2) rounds, the second in the
reverse order of the first, and pool them; the pairs a ratio compares run next to each other;
the D sweep alternates which server goes first.

The plot is ``<out>.png`` with matplotlib, else ``<out>.svg`` written by hand (beside ``--out``).

    python benchmarks/multi_adapter.py             # ~10 min on 2 cores; writes results/multi_adapter.*
    python benchmarks/multi_adapter.py --quick --out /tmp/ma.md    # a smoke run, ~2 min
    python benchmarks/multi_adapter.py --today 686a63d --out /tmp/ma.md   # + the pre-bank server
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from _common import Cell as BaseCell
from _common import launch_server, machine, run_clients, stop_process

ROOT = Path(__file__).resolve().parents[1]
PATHS = [str(ROOT / "sdk"), str(ROOT / "server")]
sys.path[:0] = [p for p in PATHS if p not in sys.path]

RESULTS = Path(__file__).resolve().parent / "results" / "multi_adapter.md"
CLIENTS = 16
WORKLOADS = ("sample", "gradient")
TITLES = {"sample": "Sample, batch 1", "gradient": "ComputeGradient, batch 1, server-side loss"}
CASES = {  # case → (server, what each request names)
    "a": ("on", "16 adapters, one per client"),
    "b": ("on", "one adapter, all 16 clients"),
    "c": ("on", "base model (no adapter)"),
    "d": ("off", "16 adapters, one per client"),
    "e": ("today", "16 adapters, one per client"),  # with --today only
}
ORDER = {"sample": ("e", "d", "a", "b", "c"), "gradient": ("c", "b", "a", "d", "e")}  # ratio pairs adjacent
DISTINCT = (1, 2, 4, 8, 16, 64)
A_OVER_D, A_OVER_B, ALONE_MAX = 3.5, 0.85, 1.10


# ---- adapters ----------------------------------------------------------------------------------

def make_adapters(artifact_dir: Path, n: int, rank: int, b_scale: float) -> list[str]:
    """``n`` random LoRA adapters of the digits model saved in ``artifact_dir`` (default tenant)."""
    import torch

    from adjointdpm_server.models import load_model
    from adjointdpm_server.models._adapters import trainable_state, with_lora
    from adjointdpm_server.storage.artifacts import ArtifactStore

    backend = load_model("digits", device="cpu", dtype=torch.float32)
    targets = tuple(backend.lora_targets)
    # with_lora draws from a fixed seed (every copy alike): it gives the names and shapes, and
    # each adapter redraws its tensors as peft's init_lora_weights=False does, from a seed of its own
    template = trainable_state(with_lora(backend.eps_fn, rank, float(rank), targets, init_lora_weights=False))
    store = ArtifactStore(artifact_dir)
    ids = []
    for i in range(n):
        gen = torch.Generator().manual_seed(10_000 + i)
        state = {}
        for name, ref in template.items():
            bound = 1.0 / math.sqrt(ref.shape[1])
            value = (torch.rand(ref.shape, generator=gen, dtype=ref.dtype) * 2 - 1) * bound
            state[name] = value * b_scale if ".lora_B." in name else value
        info = store.save("lora", state, model="digits", name=f"bench{i}",
                          metadata={"method": "lora", "rank": rank, "alpha": float(rank),
                                    "targets": list(targets)})
        ids.append(info.id)
    return ids


# ---- servers -----------------------------------------------------------------------------------

class ServerProcess:
    """``mixing`` "on"/"off": this checkout's server; "today": the one under ``server_dir``."""

    def __init__(self, mixing: str, threads: int, window_ms: float, artifacts: Path, tmp: Path,
                 server_dir: Path | None = None):
        paths = [str(server_dir), PATHS[0]] if server_dir else PATHS
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   PYTHONPATH=os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        env.pop("ADJOINTDPM_TOKENS", None)  # the default tenant: the adapters' owner
        self.mixing = mixing
        self.log_path = tmp / f"server-{mixing}.log"
        flags = [] if server_dir else ["--multi-adapter-batching", mixing]
        self.proc, self.log, self.target, self.metrics_url = launch_server(
            ["--model", "digits", "--port", "0", "--max-active-jobs", "32", "--max-queue", "64",
             "--batch-window-ms", str(window_ms), *flags, "--artifact-dir", str(artifacts),
             "--log-format", "text", "--metrics-port", "0"], self.log_path, env, cwd=tmp)

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the {self.mixing} server exited ({self.proc.returncode}); "
                               f"log {self.log_path}:\n{self.tail()}")

    def calls(self) -> tuple[float, float]:
        """(network calls, rows in them) so far, all kinds; NaNs without metrics."""
        if not self.metrics_url:
            return float("nan"), float("nan")
        try:
            text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        except OSError:
            return float("nan"), float("nan")

        def total(name):
            return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M))

        return total("adjointdpm_network_batch_size_count"), total("adjointdpm_network_batch_size_sum")

    def stop(self) -> None:
        stop_process(self.proc, self.log)


# ---- cells -------------------------------------------------------------------------------------

@dataclass
class Cell(BaseCell):
    calls: float = 0.0  # network calls and the rows in them, from the server's metrics
    rows: float = 0.0

    @property
    def rows_per_call(self) -> float:
        return self.rows / self.calls if self.calls else float("nan")

    def add(self, other: "Cell") -> None:
        self.latencies += other.latencies
        self.errors += other.errors
        self.wall += other.wall
        self.calls += other.calls
        self.rows += other.rows


def request(client, workload: str, seed: int, steps: int, adapter: str):
    import adjointdpm

    if workload == "sample":
        return client.sample(labels=random.Random(seed).randrange(10), batch=1, steps=steps,
                             seed=seed, adapter=adapter)
    return client.compute_gradient(adjointdpm.ServerLoss("classifier", {"label": 8}), labels=3,
                                   batch=1, steps=steps, seed=seed, grad_mode="", adapter=adapter)


def run_cell(server: ServerProcess, workload: str, clients: int, per_client: int, steps: int,
             pick, seed0: int = 0) -> Cell:
    """``clients`` threads, ``per_client`` requests each; request j of client k names adapter
    ``pick(k, j)`` ("" = the base)."""
    server.check_alive()
    calls0, rows0 = server.calls()
    cell = run_clients(server.target, clients, per_client, lambda client, k, j: request(
        client, workload, seed0 + 1000 * k + j, steps, pick(k, j)), Cell())
    calls1, rows1 = server.calls()
    cell.calls, cell.rows = calls1 - calls0, rows1 - rows0
    return cell


def alone(servers: dict, adapter: str, n: int, steps: int) -> dict:
    """Latencies (s) of one client's sequential batch-1 Samples, by (server, "base"/"adapter"),
    the kinds taken in turn, rotated each round."""
    import adjointdpm

    kinds = [(s, a) for a in ("base", "adapter") for s in servers]
    clients = {s: adjointdpm.Client(servers[s].target) for s in servers}
    times: dict = {k: [] for k in kinds}
    try:
        for i in range(-1, n):  # round -1: warm-up
            for s, a in kinds[i % len(kinds):] + kinds[:i % len(kinds)]:
                t0 = time.perf_counter()
                request(clients[s], "sample", 50_000 + i, steps, adapter if a == "adapter" else "")
                if i >= 0:
                    times[(s, a)].append(time.perf_counter() - t0)
    finally:
        for c in clients.values():
            c.close()
    return times


def pct(values, q) -> float:
    return 1e3 * float(np.percentile(np.asarray(values), q)) if len(values) else float("nan")


def cell_line(label: str, cell: Cell) -> str:
    return (f"  {label}: {cell.rate:7.2f} req/s  p50 {pct(cell.latencies, 50):7.0f} ms  "
            f"p95 {pct(cell.latencies, 95):7.0f} ms  rows/call {cell.rows_per_call:5.1f}"
            + (f"  ({len(cell.errors)} failed: {cell.errors[0]})" if cell.errors else ""))


# ---- the plot: PNG with matplotlib, else an SVG written by hand ------------------------------

def plot(sweep: dict, distinct: list[int], out: Path, title: str) -> Path:
    """Throughput against distinct adapters (log2 axis), one line per server: ``out`` with
    ``.png`` (matplotlib) or, where matplotlib is not installed, ``.svg``; the path written."""
    try:
        import matplotlib
    except ImportError:
        path = out.with_suffix(".svg")
        svg_plot(sweep, distinct, path, title)
        return path
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = out.with_suffix(".png")
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for s, color in (("on", "#1f77b4"), ("off", "#d62728")):
        ax.plot(distinct, [sweep[(d, s)].rate for d in distinct], "o-", color=color, label=f"batching {s}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(distinct, [str(d) for d in distinct])
    ax.set_ylim(bottom=0)
    ax.set_xlabel(f"distinct adapters among {CLIENTS} clients (log scale)")
    ax.set_ylabel("requests / s")
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def svg_plot(sweep: dict, distinct: list[int], path: Path, title: str) -> None:
    """The same plot as a small SVG written by hand."""
    w, h, left, right, top, bottom = 580, 340, 62, 140, 40, 52
    pw, ph = w - left - right, h - top - bottom
    values = [sweep[(d, s)].rate for d in distinct for s in ("on", "off")]
    finite = [v for v in values if math.isfinite(v)] or [1.0]
    step = next(s for s in (0.5, 1, 2, 2.5, 5, 10, 20, 25, 50, 100, 200, 500, 1000)
                if max(finite) / s <= 6)
    ymax = step * math.ceil(max(finite) * 1.05 / step)
    lo, hi = math.log2(distinct[0]), math.log2(distinct[-1])

    def x(d):
        return left + (pw * (math.log2(d) - lo) / (hi - lo) if hi > lo else pw / 2)

    def y(v):
        return top + ph * (1 - v / ymax)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
           'font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{left + pw / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>']
    tick = 0.0
    while tick <= ymax + 1e-9:
        out += [f'<line x1="{left}" y1="{y(tick):.1f}" x2="{left + pw}" y2="{y(tick):.1f}" stroke="#e4e4e4"/>',
                f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>']
        tick += step
    for d in distinct:
        out += [f'<line x1="{x(d):.1f}" y1="{top + ph}" x2="{x(d):.1f}" y2="{top + ph + 5}" stroke="black"/>',
                f'<text x="{x(d):.1f}" y="{top + ph + 18}" text-anchor="middle">{d}</text>']
    out += [f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="black"/>',
            f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="black"/>',
            f'<text x="{left + pw / 2}" y="{h - 12}" text-anchor="middle">distinct adapters among '
            f'{CLIENTS} clients (log scale)</text>',
            f'<text transform="translate(16 {top + ph / 2}) rotate(-90)" text-anchor="middle">'
            'requests / s</text>']
    styles = {"on": ("#1f77b4", "batching on"), "off": ("#d62728", "batching off")}
    for i, (s, (color, label)) in enumerate(styles.items()):
        pts = [(x(d), y(sweep[(d, s)].rate)) for d in distinct if math.isfinite(sweep[(d, s)].rate)]
        if pts:
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                       + " ".join(f"{px:.1f},{py:.1f}" for px, py in pts) + '"/>')
            out += [f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3.5" fill="{color}"/>' for px, py in pts]
        ly = top + 14 + 20 * i
        out += [f'<line x1="{left + pw + 14}" y1="{ly}" x2="{left + pw + 38}" y2="{ly}" stroke="{color}" '
                'stroke-width="2"/>',
                f'<circle cx="{left + pw + 26}" cy="{ly}" r="3.5" fill="{color}"/>',
                f'<text x="{left + pw + 44}" y="{ly + 4}">{label}</text>']
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


# ---- main --------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--requests", type=int, default=3, help="requests per client per cell and round")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of the 16-client cells (the second in reverse order), pooled")
    parser.add_argument("--distinct", nargs="+", type=int, default=list(DISTINCT),
                        help="distinct adapters in the sweep (at most --adapters)")
    parser.add_argument("--sweep-requests", type=int, default=4,
                        help="requests per client per sweep cell (≥ 4: all 64 adapters used at D = 64)")
    parser.add_argument("--alone", type=int, default=12, help="sequential Samples per kind, one client")
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--b-scale", type=float, default=0.1, help="LoRA B scaled by this")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--window", type=float, default=5.0, help="--batch-window-ms of both servers")
    parser.add_argument("--server-threads", type=int, default=2)
    parser.add_argument("--today", metavar="REV",
                        help="also measure the server of git revision REV (git archive; e.g. the "
                             "commit before adapter banks): case (e) and the single-client cells")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 5 steps, 1 request per client, 1 round, D in 1 64 "
                             "(2 requests per client), 3 alone")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.requests, args.rounds, args.sweep_requests, args.alone, args.steps = 1, 1, 2, 3, 5
        args.distinct = [d for d in (1, 64) if d <= args.adapters]
    args.distinct = sorted(set(args.distinct))
    if max(args.distinct) > args.adapters or CLIENTS > args.adapters:
        parser.error(f"--adapters must be at least {max(max(args.distinct), CLIENTS)}")
    import grpc
    import torch

    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t_start, load0 = time.perf_counter(), os.getloadavg()[0]
    cells: dict = {}
    sweep: dict = {}
    today_rev = ""
    with tempfile.TemporaryDirectory(prefix="adjointdpm-multi-adapter-") as tmpdir:
        tmp = Path(tmpdir)
        if args.today:  # read-only: the tree of REV, unpacked into the temporary directory
            today_rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.today],
                                       check=True, capture_output=True, text=True).stdout.strip()
            (tmp / "today").mkdir()
            tree = subprocess.run(["git", "-C", str(ROOT), "archive", args.today, "server"],
                                  check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(tmp / "today")], input=tree, check=True)
        t0 = time.perf_counter()
        ids = make_adapters(tmp / "artifacts", args.adapters, args.rank, args.b_scale)
        print(f"{len(ids)} adapters written in {time.perf_counter() - t0:.1f} s (e.g. {ids[0]})", flush=True)
        servers: dict = {}
        try:
            for s in ("on", "off"):
                servers[s] = ServerProcess(s, args.server_threads, args.window, tmp / "artifacts", tmp)
            if args.today:
                servers["today"] = ServerProcess("today", args.server_threads, args.window,
                                                 tmp / "artifacts", tmp, tmp / "today" / "server")
            print("servers: " + ", ".join(f"{k} {v.target}" for k, v in servers.items()), flush=True)
            # warm-up: each kind of call on each server, then every adapter once (into the banks;
            # today's server keeps a few adapter copies: nothing to preload)
            t0 = time.perf_counter()
            for s in servers.values():
                for w in args.workloads:
                    for a in ("", ids[0]):
                        warm = run_cell(s, w, 1, 1 if args.quick else 2, 2, lambda k, j, a=a: a,
                                        seed0=90_000)
                        if warm.errors:
                            raise RuntimeError(f"warm-up on the {s.mixing} server failed: {warm.errors[0]}")
                if s.mixing == "today":
                    continue
                warm = run_cell(s, "sample", CLIENTS, math.ceil(len(ids) / CLIENTS), 1,
                                lambda k, j: ids[(k + CLIENTS * j) % len(ids)], seed0=95_000)
                if warm.errors:
                    raise RuntimeError(f"loading the adapters on the {s.mixing} server failed: "
                                       f"{warm.errors[0]}")
            print(f"warm-up {time.perf_counter() - t0:.0f} s", flush=True)

            picks = {"a": lambda k, j: ids[k], "b": lambda k, j: ids[0], "c": lambda k, j: "",
                     "d": lambda k, j: ids[k], "e": lambda k, j: ids[k]}
            cases = [c for c in CASES if CASES[c][0] in servers]
            for w in args.workloads:
                print(f"\n{TITLES[w]}, {CLIENTS} clients", flush=True)
                for r in range(args.rounds):
                    order = [c for c in ORDER[w] if c in cases]
                    for case in (order if r % 2 == 0 else order[::-1]):
                        s = CASES[case][0]
                        cell = run_cell(servers[s], w, CLIENTS, args.requests, args.steps, picks[case],
                                        seed0=100_000 * (r + 1))
                        cells.setdefault((w, case), Cell()).add(cell)
                        print(cell_line(f"round {r + 1} ({case}) {s:<5} {CASES[case][1]:<28}", cell), flush=True)

            print(f"\nSample, batch 1, {CLIENTS} clients over D distinct adapters", flush=True)
            for i, d in enumerate(args.distinct):
                for s in (("off", "on") if i % 2 == 0 else ("on", "off")):
                    cell = sweep[(d, s)] = run_cell(
                        servers[s], "sample", CLIENTS, args.sweep_requests, args.steps,
                        lambda k, j, d=d: ids[(k + CLIENTS * j) % d], seed0=700_000)
                    print(cell_line(f"D={d:<3} batching {s:<3}", cell), flush=True)

            print(f"\nOne client alone, {args.alone} sequential batch-1 Samples per kind", flush=True)
            alone_times = alone(servers, ids[0], args.alone, args.steps)
            for (s, a), times in alone_times.items():
                print(f"  {a:<7} {'today' if s == 'today' else 'batching ' + s:<12}: p50 "
                      f"{pct(times, 50):5.0f} ms  p95 {pct(times, 95):5.0f} ms", flush=True)
            for s in servers.values():
                s.check_alive()
        finally:
            for s in servers.values():
                s.stop()
    total = time.perf_counter() - t_start

    # ---- the results file ----------------------------------------------------------------------
    def met(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    def failed(*cs: Cell) -> str:
        n = sum(len(c.errors) for c in cs)
        return f"{n}" if n else "0"

    lines = [
        "# Multi-adapter batching: many LoRA adapters of one model in one network call",
        "",
        f"- Command: `{' '.join(['python', 'benchmarks/multi_adapter.py'] + sys.argv[1:])}`",
        f"- Date: {started}; total {total / 60:.1f} min; load average at start / end "
        f"{load0:.2f} / {os.getloadavg()[0]:.2f}",
        f"- Machine: {machine()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"grpcio {grpc.__version__}; device: CPU",
        (f"- Servers: two fresh subprocesses `python -m adjointdpm_server --model digits "
         f"--max-active-jobs 32 --max-queue 64 --batch-window-ms {args.window:g} --metrics-port 0 "
         f"--multi-adapter-batching on|off` on one artifact directory, `OMP_NUM_THREADS="
         f"{args.server_threads}`, default `--adapter-cache-mib` (the bank holds all adapters)"
         + (f"; and **today**: the server of `{today_rev}` (`git archive`), the same flags but "
            "`--multi-adapter-batching`" if today_rev else "")),
        (f"- Adapters: {args.adapters} random LoRA adapters of the digits model (rank {args.rank}, "
         f"alpha {args.rank}, the model's `lora_targets`, B × {args.b_scale:g}), written with the "
         "server's `ArtifactStore` into the default tenant before the servers start; each used "
         "once on each server before measuring (steady state: no first loads in the cells)"),
        (f"- Clients: {CLIENTS} threads, each its own `adjointdpm.Client`, {args.requests} requests "
         f"back to back per cell and round, {args.rounds} round(s) (the second in reverse order) "
         f"pooled; D sweep: {args.sweep_requests} requests per client; digits model, {args.steps} "
         "steps, server defaults (dpm3, CFG 2, grad_mode auto). Throughput = requests / wall "
         "time; latency as the caller sees it; rows/call = mean rows per network call over the "
         "cell, from the server's /metrics (all kinds; a batch-1 request is 2 rows, CFG's cond "
         "and uncond)."),
        "",
        "## Method",
        "",
        ("Two servers identical but for `--multi-adapter-batching`: **on**, rows of different "
         "adapters of the model share one network call (the base runs once for the batch, each "
         "row adds its own adapter's LoRA delta); **off**, each adapter's calls batch only with "
         "that adapter's — the previous batching rule, but on the same adapter bank (the code "
         "before adapter banks, **today**, is measured only with `--today REV`: case (e) and the "
         "single-client table). Case (a) is the point of the feature: 16 callers, each on its "
         "own adapter. (b) (everyone on one adapter) and (c) (the base) are what batching gives "
         "when adapters do not differ, (d) is (a) without mixing. The sweep spreads the 16 "
         "clients over D distinct adapters. The single-client latencies check that one caller "
         "pays nothing for the feature. Cells of the servers are interleaved so that drifting "
         "load on a shared machine hits all alike."),
        "",
    ]
    for w in args.workloads:
        lines += [f"## {TITLES[w]}, {CLIENTS} clients", "",
                  "| case | server | requests name | req/s | p50 ms | p95 ms | rows/call | failed |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        for case in cases:
            c = cells[(w, case)]
            lines.append(f"| ({case}) | {CASES[case][0]} | {CASES[case][1]} | {c.rate:.2f} | "
                         f"{pct(c.latencies, 50):.0f} | {pct(c.latencies, 95):.0f} | "
                         f"{c.rows_per_call:.1f} | {failed(c)} |")
        lines.append("")
    lines += [f"## Throughput against distinct adapters (Sample, batch 1, {CLIENTS} clients)", "",
              "Request j of client k names adapter (k + 16·j) mod D.", "",
              "| D | on req/s | off req/s | on / off | on p50 ms | off p50 ms | on rows/call | "
              "off rows/call | failed |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for d in args.distinct:
        on, off = sweep[(d, "on")], sweep[(d, "off")]
        lines.append(f"| {d} | {on.rate:.2f} | {off.rate:.2f} | {on.rate / off.rate:.2f}× | "
                     f"{pct(on.latencies, 50):.0f} | {pct(off.latencies, 50):.0f} | "
                     f"{on.rows_per_call:.1f} | {off.rows_per_call:.1f} | {failed(on, off)} |")
    try:
        import matplotlib  # noqa: F401 — only which file the plot will be
        figure = args.out.with_suffix(".png")
    except ImportError:
        figure = args.out.with_suffix(".svg")
    today = "today" in servers
    lines += ["", f"![throughput against distinct adapters]({figure.name})", "",
              "## One client alone (Sample, batch 1)", "",
              f"{args.alone} sequential requests per kind, the kinds taken in turn.", "",
              "| requests name | on p50 ms | off p50 ms | on / off | "
              + ("today p50 ms | on / today | " if today else "") + "on p95 ms | off p95 ms |",
              "|---|---:|---:|---:|" + ("---:|---:|" if today else "") + "---:|---:|"]
    for a in ("base", "adapter"):
        on, off = alone_times[("on", a)], alone_times[("off", a)]
        extra = ""
        if today:
            then = alone_times[("today", a)]
            extra = f"{pct(then, 50):.0f} | {pct(on, 50) / pct(then, 50):.2f} | "
        lines.append(f"| {'the base model' if a == 'base' else 'one adapter'} | {pct(on, 50):.0f} | "
                     f"{pct(off, 50):.0f} | {pct(on, 50) / pct(off, 50):.2f} | {extra}{pct(on, 95):.0f} | "
                     f"{pct(off, 95):.0f} |")
    lines += ["", "## Against the targets", "",
              "| target | measured | |", "|---|---:|---|"]
    for w in args.workloads:
        a, b, d = cells[(w, "a")], cells[(w, "b")], cells[(w, "d")]
        lines.append(f"| {TITLES[w]}: (a) / (d) throughput ≥ {A_OVER_D:g}× | {a.rate / d.rate:.2f}× | "
                     f"{met(a.rate / d.rate >= A_OVER_D)} |")
        lines.append(f"| {TITLES[w]}: (a) / (b) throughput ≥ {A_OVER_B:g} | {a.rate / b.rate:.2f} | "
                     f"{met(a.rate / b.rate >= A_OVER_B)} |")
        if today:
            e = cells[(w, "e")]
            lines.append(f"| {TITLES[w]}: (a) / (e) throughput ≥ {A_OVER_D:g}× (against today) | "
                         f"{a.rate / e.rate:.2f}× | {met(a.rate / e.rate >= A_OVER_D)} |")
    for a in ("base", "adapter"):
        r = pct(alone_times[("on", a)], 50) / pct(alone_times[("off", a)], 50)
        what = "the base model" if a == "base" else "one adapter"
        lines.append(f"| one client, {what}: p50 on / off ≤ {ALONE_MAX:g} | {r:.2f} | {met(r <= ALONE_MAX)} |")
        if today:
            r = pct(alone_times[("on", a)], 50) / pct(alone_times[("today", a)], 50)
            lines.append(f"| one client, {what}: p50 on / today ≤ {ALONE_MAX:g} | {r:.2f} | "
                         f"{met(r <= ALONE_MAX)} |")
    errors = [e for c in [*cells.values(), *sweep.values()] for e in c.errors]
    lines += ["", "## Notes", "",
              f"- Failed requests: {len(errors)}" + (f" (first: `{errors[0]}`)" if errors else ""),
              "- Interpretation: _to be written after reading the numbers._", ""]
    text = "\n".join(lines)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    figure = plot(sweep, args.distinct, args.out, f"Sample, batch 1, {CLIENTS} clients: throughput")
    print(f"wrote {args.out} and {figure}")


if __name__ == "__main__":
    main()
