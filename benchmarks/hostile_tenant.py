"""A hostile tenant beside a well-behaved one: tenant B's latency alone and under each of tenant
A's attacks, and what fairness costs A, on one server with default flags.

One fresh server subprocess (``python -m adjointdpm_server --model digits --port 0
--artifact-dir DIR``, default flags but ``--metrics-port 0``, which only serves /metrics: the
per-tenant device seconds and jobs in the tables come from it), two tenants ``alice`` (A,
``token-a``) and ``bob`` (B, ``token-b``), ``OMP_NUM_THREADS`` = ``--server-threads``.

B, the well-behaved tenant, runs sequential batch-1 calls, alternating ``sample(labels=k % 10,
batch=1, steps=10, seed=k)`` and ``compute_gradient(ServerLoss("classifier", {"label": 8}),
labels=k % 10, steps=10, seed=k)``, ``--b-calls`` of each per phase. Phases: ``alone``, then one
per attack of A, then ``alone`` again; the baseline is both alone phases pooled (drift on a
shared machine hits both ends). A refused or failed call of B counts as a refusal (its code is
recorded) and B goes on. B's calls are streamed only to see whether one waited for a job slot
(a QueuePosition event > 0) and when its first solver step came.

A's attacks (each started, established, measured beside B, stopped and drained before the next):

- ``silent-16``, ``silent-48``: N raw ComputeGradient streams with a client-side loss
  (``LossTerm(client="never")``) whose query A never answers, the request stream kept open;
  established when min(N, 16) have been asked (the rest may be queued, parked or refused).
- ``samples-64``: 16 threads, each looping ``sample(batch=64, steps=10)``.
- ``finetunes``: 16 threads, each running a ``finetune_weights(ServerLoss("classifier",
  {"label": 3}), …, iterations=1000, steps=3, lora_rank=2)`` (a new one if it ends).
- ``burst-200``: 200 threads, each looping a short ``sample(labels=1, steps=3)``.

A runs in its own process (``--attacker KIND``, internal), so that its 200 Python threads do not
share B's interpreter lock: B's latency is the server's doing (and the machine's two cores'), not
the client's. A retries a refused call after the server's retry-after hint, clamped to
0.05…1 s — a client spinning on refusals would measure this machine's cores, not the server.

A's throughput (samples-64: images/s, counted per solver step as 64 / steps images; finetunes:
iterations/s; burst-200: completed calls/s): alone, in two windows of ``--a-seconds`` / 2 right
before and right after B's phase with the same attack running (interleaved, so drift hits both),
and beside B, over B's phase. Targets (the issue): under every attack B's p50 ≤ 1.5× alone, p99
≤ 3× alone, zero refusals; A's throughput beside B ≥ 0.8× alone.

    python benchmarks/hostile_tenant.py              # ~6 min on 2 cores; writes results/hostile_tenant.md
    python benchmarks/hostile_tenant.py --quick --out /tmp/hostile.md     # a smoke run, ~2 min
    python benchmarks/hostile_tenant.py --attacks silent-16 burst-200 --b-calls 6
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.metadata
import json
import os
import platform
import queue
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from _common import launch_server, machine, stop_process, write_report

ROOT = Path(__file__).resolve().parents[1]
PATHS = [str(ROOT / "sdk"), str(ROOT / "server")]
sys.path[:0] = [p for p in PATHS if p not in sys.path]

RESULTS = Path(__file__).resolve().parent / "results" / "hostile_tenant.md"
TOKENS = "alice:token-a,bob:token-b"
TOKEN_A, TOKEN_B = "token-a", "token-b"
TENANT_A, TENANT_B = "tenant:alice", "tenant:bob"
STEPS = 10  # B's calls, the silent streams' and samples-64's
ATTACKS = ("silent-16", "silent-48", "samples-64", "finetunes", "burst-200")
UNITS = {"samples-64": "images/s", "finetunes": "iterations/s", "burst-200": "calls/s"}
TITLES = {"silent-16": "16 unanswered client-loss streams",
          "silent-48": "48 unanswered client-loss streams",
          "samples-64": "16 loops of batch-64 Samples",
          "finetunes": "16 long fine-tunes (1000 iterations, LoRA rank 2)",
          "burst-200": "200 concurrent short Samples (3 steps), looping"}
EXAMPLES = [{"seed": k, "label": k} for k in range(2)]
P50_MAX, P99_MAX, A_MIN = 1.5, 3.0, 0.8


# ---- tenant A: the attacker process ------------------------------------------------------------

def _pause(err) -> None:
    """Wait as the server's hint says, clamped (see the module's docstring)."""
    hint = getattr(err, "retry_after", None)
    time.sleep(min(1.0, max(0.05, 0.25 if hint is None else hint)))


class _Silent:
    """A raw ComputeGradient stream whose client-loss query is asked and never answered (the
    request stream stays open); ``code``: how it ended, None while open."""

    def __init__(self, channel, seed: int):
        from adjointdpm.v1 import adjointdpm_pb2 as pb
        from adjointdpm.v1 import adjointdpm_pb2_grpc as pb_grpc

        self.hold, self.asked, self.code, self.ended_at, self.details = threading.Event(), False, None, None, ""
        request = pb.GradientSpec(generation=pb.Generation(labels=[1], seed=seed, steps=STEPS),
                                     losses=[pb.LossTerm(client="never", weight=1.0)])

        def requests():
            yield pb.ComputeGradientRequest(spec=request)
            self.hold.wait()  # say nothing more, keep the stream open

        self.call = pb_grpc.AdjointDPMServiceStub(channel).ComputeGradient(
            requests(), metadata=(("authorization", f"Bearer {TOKEN_A}"),), timeout=600)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        import grpc

        code = "OK"
        try:
            for event in self.call:
                if event.WhichOneof("kind") == "loss_query":
                    self.asked = True
        except grpc.RpcError as err:
            code, self.details = err.code().name, err.details() or ""
        finally:
            self.ended_at, self.code = time.time(), code
            self.hold.set()

    def close(self):
        self.call.cancel()
        self.hold.set()


class _SilentAttack:
    def __init__(self, target: str, n: int):
        import grpc

        self.n, self.work = n, []
        self.channel = grpc.insecure_channel(target)
        self.streams = [_Silent(self.channel, seed=k) for k in range(n)]
        self.stopped_at = None

    def ready(self) -> bool:
        return (sum(s.asked for s in self.streams) >= min(self.n, 16)
                or all(s.asked or s.code is not None for s in self.streams))

    def info(self) -> dict:
        ended = collections.Counter(s.code for s in self.streams if s.code is not None
                                    and (self.stopped_at is None or s.ended_at < self.stopped_at))
        details = {s.code: s.details for s in self.streams if s.code not in (None, "OK", "CANCELLED")}
        return {"streams": self.n, "asked": sum(s.asked for s in self.streams),
                "ended before stop": dict(ended), "details": details}

    def stop(self) -> None:
        self.stopped_at = time.time()
        for s in self.streams:
            s.close()
        for s in self.streams:
            s.thread.join(30)
        self.channel.close()

    def codes(self) -> dict:
        early = collections.Counter(s.code for s in self.streams
                                    if s.ended_at is not None and s.ended_at < self.stopped_at)
        early["open at stop (cancelled)"] = sum(s.ended_at is None or s.ended_at >= self.stopped_at
                                                for s in self.streams)
        return {k: v for k, v in early.items() if v}


class _LoopAttack:
    """``threads`` threads, each running one call of ``kind`` after another until stopped; every
    call is a streaming one, so that stopping cancels it at once."""

    def __init__(self, target: str, kind: str, threads: int):
        import adjointdpm

        self.kind, self.n = kind, threads
        self.clients = [adjointdpm.Client(target, token=TOKEN_A, timeout=600) for _ in range(min(8, threads))]
        self.halt, self.lock = threading.Event(), threading.Lock()
        self.work: list[tuple[float, float]] = []  # (time, units of A's throughput)
        self.ended = collections.Counter()
        self.started = 0
        self.current: list = [None] * threads
        self.seen = [False] * threads  # a first event, or the first call's end
        self.details: dict[str, str] = {}
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)]
        for t in self.threads:
            t.start()

    def _call(self, client, i: int):
        import adjointdpm

        if self.kind == "samples-64":
            return client.sample(labels=[(i + k) % 10 for k in range(64)], batch=64, steps=STEPS,
                                 seed=i, stream=True, progress=False)
        if self.kind == "finetunes":
            return client.finetune_weights(adjointdpm.ServerLoss("classifier", {"label": 3}), EXAMPLES,
                                           iterations=1000, steps=3, lora_rank=2, stream=True,
                                           progress=False)
        return client.sample(labels=1, steps=3, seed=i, stream=True, progress=False)  # burst-200

    def _units(self, kind: str) -> float:
        if self.kind == "samples-64" and kind == "progress":
            return 64 / STEPS  # one solver step of 64 images
        if self.kind == "finetunes" and kind == "iteration":
            return 1.0
        return 0.0

    def _loop(self, i: int) -> None:
        import adjointdpm

        client = self.clients[i % len(self.clients)]
        while not self.halt.is_set():
            err, code = None, "OK"
            try:
                call = self._call(client, i)
                with self.lock:
                    self.current[i] = call
                    self.started += 1
                if self.halt.is_set():
                    call.cancel()
                for event in call:
                    self.seen[i] = True
                    units = self._units(event.WhichOneof("kind"))
                    if units:
                        self.work.append((time.time(), units))
                if call.result is None:
                    code = "ended without a result"
                elif self.kind == "burst-200":
                    self.work.append((time.time(), 1.0))
            except adjointdpm.AdjointDPMError as e:
                err, code = e, e.code.name
                self.details.setdefault(code, e.details)
            except Exception as e:  # noqa: BLE001 — counted and reported
                err, code = e, type(e).__name__
                self.details.setdefault(code, str(e))
            self.seen[i] = True
            if self.halt.is_set() and code == "CANCELLED":
                code = "cancelled at stop"
            with self.lock:
                self.ended[code] += 1
            if err is not None and not self.halt.is_set():
                _pause(err)

    def ready(self) -> bool:
        return all(self.seen) and (self.kind == "burst-200" or bool(self.work))

    def info(self) -> dict:
        with self.lock:
            return {"threads": self.n, "calls": self.started, "ended": dict(self.ended),
                    "details": dict(self.details)}

    def stop(self) -> None:
        self.halt.set()
        with self.lock:
            calls = [c for c in self.current if c is not None]
        for c in calls:
            c.cancel()
        for t in self.threads:
            t.join(30)
        for c in self.clients:
            c.close()

    def codes(self) -> dict:
        return dict(self.ended)


def attacker_main(kind: str, target: str) -> None:
    """The child process: start the attack, say ``ready`` (a JSON line) once it is established,
    run until a line (or EOF) on stdin, stop, and say ``done`` with what A got."""

    def say(**msg):
        print(json.dumps(msg), flush=True)

    attack = (_SilentAttack(target, int(kind.split("-")[1])) if kind.startswith("silent")
              else _LoopAttack(target, kind, 200 if kind == "burst-200" else 16))
    deadline = time.time() + 180
    while not attack.ready() and time.time() < deadline:
        time.sleep(0.05)
    say(event="ready", t=time.time(), established=attack.ready(), info=attack.info())
    sys.stdin.readline()
    stopped = time.time()
    info = attack.info()
    attack.stop()
    say(event="done", t=stopped, info=info, codes=attack.codes(), work=attack.work)


class Attacker:
    """Tenant A's attack, in a child process (this file with ``--attacker KIND``)."""

    def __init__(self, kind: str, target: str, tmp: Path, env: dict):
        self.kind = kind
        self.log_path = tmp / f"attacker-{kind}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 — open as long as the child runs
        self.proc = subprocess.Popen([sys.executable, __file__, "--attacker", kind, "--target", target],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                pass
        self.lines.put(None)

    def _next(self, timeout: float) -> dict:
        try:
            msg = self.lines.get(timeout=timeout)
        except queue.Empty:
            msg = None
        if msg is None:
            raise RuntimeError(f"attacker {self.kind}: no answer (log {self.log_path}: "
                               f"{self.log_path.read_text()[-1500:]})")
        return msg

    def wait_ready(self) -> dict:
        return self._next(240)

    def stop(self) -> dict:
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        try:
            return self._next(120)
        finally:
            self.close()

    def close(self) -> None:
        stop_process(self.proc, self.log, terminate=False)  # told to stop: it ends by itself


# ---- the server, its metrics, tenant B ---------------------------------------------------------

def child_env(threads: int | None = None) -> dict:
    env = dict(os.environ, ADJOINTDPM_TOKENS=TOKENS,
               PYTHONPATH=os.pathsep.join(PATHS + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    n = str(threads or 1)
    env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n)
    return env


class ServerProcess:
    def __init__(self, threads: int, tmp: Path, extra: list[str] = ()):
        self.log_path = tmp / "server.log"
        self.proc, self.log, self.target, self.metrics_url = launch_server(
            ["--model", "digits", "--port", "0", "--artifact-dir", str(tmp / "artifacts"),
             "--log-format", "text", "--metrics-port", "0", *extra], self.log_path, child_env(threads))

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the server exited ({self.proc.returncode}); log {self.log_path}:\n{self.tail()}")

    def scrape(self) -> dict:
        """Per tenant: device seconds so far and jobs by state (empty without metrics)."""
        out: dict = {"device_s": {}, "jobs": {}}
        if not self.metrics_url:
            return out
        try:
            text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        except OSError:
            return out
        for m in re.finditer(r'^adjointdpm_tenant_device_seconds(?:_total)?\{tenant="([^"]+)"\} (\S+)$',
                             text, re.M):
            out["device_s"][m.group(1)] = float(m.group(2))
        for m in re.finditer(r'^adjointdpm_tenant_jobs\{([^}]*)\} (\S+)$', text, re.M):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            out["jobs"].setdefault(labels.get("tenant"), {})[labels.get("state")] = int(float(m.group(2)))
        return out

    def wait_idle(self, timeout: float = 90) -> float:
        """Until A has no job left (by the metrics), then 1 s more; the seconds it took."""
        t0 = time.perf_counter()
        while self.metrics_url and time.perf_counter() - t0 < timeout:
            self.check_alive()
            if not sum(self.scrape()["jobs"].get(TENANT_A, {}).values()):
                break
            time.sleep(0.2)
        time.sleep(1.0 if self.metrics_url else 3.0)
        return time.perf_counter() - t0

    def stop(self) -> None:
        stop_process(self.proc, self.log)


@dataclass
class BRun:
    latencies: dict = field(default_factory=lambda: {"sample": [], "gradient": []})
    first_step: dict = field(default_factory=lambda: {"sample": [], "gradient": []})  # s to its first step
    queued: collections.Counter = field(default_factory=collections.Counter)  # calls that waited for a slot
    refusals: list = field(default_factory=list)  # (kind, code, details)
    start: float = 0.0
    end: float = 0.0


def run_b(client, calls: int) -> BRun:
    """B's phase: ``calls`` Samples and ``calls`` ComputeGradients alternating, one at a time."""
    import adjointdpm
    import grpc

    loss = adjointdpm.ServerLoss("classifier", {"label": 8})
    run = BRun(start=time.time())
    for k in range(calls):
        for kind in ("sample", "gradient"):
            t0, first, queued = time.perf_counter(), None, False
            try:
                call = (client.sample(labels=k % 10, batch=1, steps=STEPS, seed=k, stream=True,
                                      progress=False) if kind == "sample" else
                        client.compute_gradient(loss, labels=k % 10, steps=STEPS, seed=k, stream=True,
                                                progress=False))
                for event in call:  # the events say whether the job waited for a slot
                    what = event.WhichOneof("kind")
                    queued |= what == "queued" and event.queued.position > 0
                    if what == "progress" and first is None:
                        first = time.perf_counter() - t0
                if call.result is None:
                    raise adjointdpm.AdjointDPMError(grpc.StatusCode.UNKNOWN, "no result")
            except adjointdpm.AdjointDPMError as err:
                run.refusals.append((kind, err.code.name, err.details))
                continue
            except Exception as err:  # noqa: BLE001 — a refusal of another kind, reported
                run.refusals.append((kind, type(err).__name__, str(err)))
                continue
            run.latencies[kind].append(time.perf_counter() - t0)
            run.first_step[kind].append(first if first is not None else float("nan"))
            run.queued[kind] += queued
    run.end = time.time()
    return run


def measured_b(server: "ServerProcess", client, calls: int) -> tuple[BRun, dict]:
    """B's phase and each tenant's device seconds over it (the server's counter)."""
    m0 = server.scrape()
    b = run_b(client, calls)
    m1 = server.scrape()
    return b, {t: m1["device_s"].get(t, 0.0) - m0["device_s"].get(t, 0.0) for t in (TENANT_A, TENANT_B)}


def pct(values, q) -> float:
    return 1e3 * float(np.percentile(np.asarray(values), q)) if len(values) else float("nan")


def rate(work, windows) -> float:
    span = sum(b - a for a, b in windows)
    units = sum(u for t, u in work if any(a <= t < b for a, b in windows))
    return units / span if span > 0 else float("nan")


@dataclass
class Phase:
    name: str
    b: BRun
    attack: dict | None = None  # ready info, done info, codes
    a_alone: float = float("nan")
    a_with_b: float = float("nan")
    device_s: dict = field(default_factory=dict)  # tenant → device seconds over B's phase
    a_jobs: dict = field(default_factory=dict)  # A's jobs by state at B's start
    setup_s: float = 0.0
    drain_s: float = 0.0


def run_attack(kind: str, server: ServerProcess, client, args, tmp: Path) -> Phase:
    t0 = time.perf_counter()
    attacker = Attacker(kind, server.target, tmp, child_env())
    try:
        ready = attacker.wait_ready()
        setup = time.perf_counter() - t0
        half = args.a_seconds / 2
        windows = []
        if kind in UNITS:
            time.sleep(args.settle)
            w0 = time.time()
            time.sleep(half)
            windows.append((w0, time.time()))
        server.check_alive()
        a_jobs = server.scrape()["jobs"].get(TENANT_A, {})
        b, device_s = measured_b(server, client, args.b_calls)
        if kind in UNITS:
            w0 = time.time()
            time.sleep(half)
            windows.append((w0, time.time()))
        done = attacker.stop()
    except BaseException:
        attacker.proc.kill()
        attacker.close()
        raise
    phase = Phase(kind, b, {"ready": ready, "done": done}, setup_s=setup)
    if kind in UNITS:
        phase.a_alone = rate(done["work"], windows)
        phase.a_with_b = rate(done["work"], [(b.start, b.end)])
    phase.device_s, phase.a_jobs = device_s, a_jobs
    phase.drain_s = server.wait_idle()
    server.check_alive()
    return phase


# ---- the report ---------------------------------------------------------------------------------

def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def verdict(phase: Phase, base: dict) -> tuple[str, list[str]]:
    missed = []
    for kind, title in (("sample", "Sample"), ("gradient", "Gradient")):
        lat = phase.b.latencies[kind]
        for q, limit in ((50, P50_MAX), (99, P99_MAX)):
            r = pct(lat, q) / base[(kind, q)] if lat else float("inf")
            if not r <= limit:
                missed.append(f"{title} p{q} {r:.2f}×")
    if phase.b.refusals:
        missed.append(f"{len(phase.b.refusals)} refusals")
    if phase.name in UNITS:
        r = phase.a_with_b / phase.a_alone if phase.a_alone else float("nan")
        if not r >= A_MIN:
            missed.append(f"A {r:.2f}×")
    return ("PASS" if not missed else "MISS"), missed


def cell(values, q, base=None) -> str:
    if not values:
        return "—"
    v = pct(values, q)
    return f"{v:.0f}" + (f" ({v / base:.2f}×)" if base else "")


def report(args, phases: list[Phase], started: str, total: float, load0: float, server_log: Path) -> str:
    alone = [p for p in phases if p.name.startswith("alone")]
    pooled = {k: [x for p in alone for x in p.b.latencies[k]] for k in ("sample", "gradient")}
    base = {(k, q): pct(pooled[k], q) for k in pooled for q in (50, 99)}
    command = " ".join(["python", "benchmarks/hostile_tenant.py"] + sys.argv[1:])
    lines = [
        "# A hostile tenant beside a well-behaved one",
        "",
        f"- Command: `{command}`",
        f"- Date: {started}; total {total / 60:.1f} min; load average at start / end "
        f"{load0:.2f} / {os.getloadavg()[0]:.2f}",
        f"- Machine: {machine()}, Python {platform.python_version()}, torch {version('torch')}, "
        f"grpcio {version('grpcio')}; device: CPU",
        f"- Server: one fresh subprocess `python -m adjointdpm_server --model digits` with "
        f"{('`' + args.server_args + '`') if args.server_args else 'default flags'} "
        f"(and `--metrics-port 0`, for the per-tenant numbers), `OMP_NUM_THREADS="
        f"{args.server_threads}`, tenants alice (A) and bob (B)",
        f"- B: sequential batch-1 calls, {args.b_calls} Samples and {args.b_calls} ComputeGradients "
        f"(server-side classifier loss) alternating, {STEPS} steps, per phase; baseline: the two "
        f"alone phases pooled (the first and the last phase). A: its own process; throughput alone "
        f"over {args.a_seconds:g} s (half right before, half right after B's phase, the same attack "
        f"running) and beside B over B's phase.",
        f"- Targets: B's p50 ≤ {P50_MAX:g}× and p99 ≤ {P99_MAX:g}× alone, no refusal of B; A beside "
        f"B ≥ {A_MIN:g}× A alone. p99 of {args.b_calls} calls is about their maximum.",
        "",
        "## Tenant B under each attack",
        "",
        "| phase | B Sample p50 ms | B Sample p99 ms | B Gradient p50 ms | B Gradient p99 ms | "
        "B refusals | A alone | A beside B | A ratio | device s A / B | verdict |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in phases:
        s, g = p.b.latencies["sample"], p.b.latencies["gradient"]
        attack = not p.name.startswith("alone")
        b = (lambda k, q: base[(k, q)]) if attack else (lambda k, q: None)
        if p.name in UNITS:
            a = (f"{p.a_alone:.2f} {UNITS[p.name]}", f"{p.a_with_b:.2f}",
                 f"{p.a_with_b / p.a_alone:.2f}×" if p.a_alone else "—")
        else:
            a = ("n/a", "n/a", "n/a") if attack else ("", "", "")
        dev = (f"{p.device_s.get(TENANT_A, 0):.1f} / {p.device_s.get(TENANT_B, 0):.1f}"
               if p.device_s else "")
        v, missed = verdict(p, base) if attack else ("", [])
        lines.append(f"| {p.name} | {cell(s, 50, b('sample', 50))} | {cell(s, 99, b('sample', 99))} | "
                     f"{cell(g, 50, b('gradient', 50))} | {cell(g, 99, b('gradient', 99))} | "
                     f"{len(p.b.refusals)} | {a[0]} | {a[1]} | {a[2]} | {dev} | "
                     f"{v + (': ' + ', '.join(missed) if missed else '')} |")
    lines.append(f"| **baseline** (alone, pooled) | {base[('sample', 50)]:.0f} | {base[('sample', 99)]:.0f} | "
                 f"{base[('gradient', 50)]:.0f} | {base[('gradient', 99)]:.0f} | "
                 f"{sum(len(p.b.refusals) for p in alone)} | | | | | |")
    lines += ["", "Ratios are to the baseline. Device s: each tenant's device seconds over B's phase "
              "(the server's `adjointdpm_tenant_device_seconds`).", "",
              "## Where B's time went", "",
              "| phase | B's phase s | B device s | B device / B's phase | B's device share | "
              "B calls queued for a slot | B to first step p50 / max ms |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for p in phases:
        wall = p.b.end - p.b.start
        a_s, b_s = p.device_s.get(TENANT_A, 0.0), p.device_s.get(TENANT_B, 0.0)
        first = [x for k in ("sample", "gradient") for x in p.b.first_step[k] if x == x]
        share = f"{b_s / (a_s + b_s):.0%}" if a_s + b_s > 0 else "—"
        lines.append(f"| {p.name} | {wall:.1f} | {b_s:.1f} | {b_s / wall:.0%} | {share} | "
                     f"{sum(p.b.queued.values())} of {sum(len(v) for v in p.b.latencies.values())} | "
                     f"{cell(first, 50)} / {cell(first, 100)} |")
    lines += ["", "B device / B's phase: how much of the device B's own calls keep busy; alone, "
              "that is the share B can claim beside A under device fair share — A's best beside "
              "B is about 1 − B's share of its time alone.", "",
              "## Tenant A's side", "",
              "| attack | set-up s | A's jobs at B's start | A's calls | how they ended | drain s |",
              "|---|---:|---|---:|---|---:|"]
    for p in phases:
        if p.attack is None:
            continue
        ready, done = p.attack["ready"], p.attack["done"]
        info = done["info"]
        jobs = ", ".join(f"{k} {v}" for k, v in sorted(p.a_jobs.items())) or "—"
        if p.name.startswith("silent"):
            calls = f"{info['streams']} ({ready['info']['asked']} asked at start, {info['asked']} by the end)"
        else:
            calls = str(info["calls"])
        ended = ", ".join(f"{k} {v}" for k, v in sorted(done["codes"].items()))
        established = "" if ready.get("established") else " (not established in 180 s)"
        lines.append(f"| {p.name}{established} | {p.setup_s:.1f} | {jobs} | {calls} | {ended} | {p.drain_s:.1f} |")
    notes = []
    for p in phases:
        for code, details in sorted(((p.attack or {}).get("done", {}).get("info", {}).get("details") or {}).items()):
            notes.append(f"- {p.name}, A's {code}: {details}")
        for kind, code, details in p.b.refusals:
            notes.append(f"- {p.name}, **B's {kind} refused**: {code}: {details}")
    if notes:
        lines += ["", "Messages (the first of each code):", ""] + notes
    lines += ["", "## Against the targets", ""]
    for p in phases:
        if not p.name.startswith("alone"):
            v, missed = verdict(p, base)
            lines.append(f"- {TITLES[p.name]} (`{p.name}`): **{v}**" + (f" — missed: {', '.join(missed)}" if missed else ""))
    lines += ["", f"Server log: `{server_log}` (removed after a clean run unless `--keep`)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS))
    parser.add_argument("--b-calls", type=int, help="B's calls of each kind per phase (default 12, --quick 4)")
    parser.add_argument("--a-seconds", type=float, help="A's alone window per attack (default 20, --quick 6)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after an attack is established")
    parser.add_argument("--server-threads", type=int, default=2)
    parser.add_argument("--server-args", default="", help="more server flags, e.g. "
                        "'--engine-chunk-rows 32' (the targets are for the defaults)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few calls, short windows")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--attacker", choices=ATTACKS, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attacker:
        attacker_main(args.attacker, args.target)
        return
    args.b_calls = args.b_calls or (4 if args.quick else 12)
    args.a_seconds = args.a_seconds or (6.0 if args.quick else 20.0)
    if args.quick:
        args.settle = min(args.settle, 1.0)
    import adjointdpm

    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t_start, load0 = time.perf_counter(), os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="adjointdpm-hostile-"))
    server = ServerProcess(args.server_threads, tmp, shlex.split(args.server_args))
    print(f"server {server.target}, log {server.log_path}, metrics {server.metrics_url}", flush=True)
    phases: list[Phase] = []
    ok = False
    try:
        with adjointdpm.Client(server.target, token=TOKEN_B, timeout=120) as b, \
                adjointdpm.Client(server.target, token=TOKEN_A, timeout=120) as a:
            run_b(b, 2)  # warm-up: each kind of call's lazy set-up
            a.sample(labels=list(range(10)) * 6 + [1] * 4, batch=64, steps=STEPS)
            a.sample(labels=1, steps=3)
            a.finetune_weights(adjointdpm.ServerLoss("classifier", {"label": 3}), EXAMPLES,
                               iterations=1, steps=3, lora_rank=2)

            def show(p: Phase) -> None:
                s, g = p.b.latencies["sample"], p.b.latencies["gradient"]
                extra = (f"; A {p.a_alone:.2f} alone, {p.a_with_b:.2f} beside B {UNITS[p.name]}"
                         if p.name in UNITS else "")
                codes = collections.Counter(code for _, code, _ in p.b.refusals)
                print(f"  {p.name:<11} B Sample p50 {pct(s, 50):6.0f} p99 {pct(s, 99):6.0f} ms, Gradient p50 "
                      f"{pct(g, 50):6.0f} p99 {pct(g, 99):6.0f} ms, refusals {dict(codes) or 0}{extra}"
                      + (f"; A ended {p.attack['done']['codes']}" if p.attack else ""), flush=True)

            def alone(name: str) -> Phase:
                run, device_s = measured_b(server, b, args.b_calls)
                return Phase(name, run, device_s=device_s)

            phases.append(alone("alone"))
            show(phases[-1])
            for kind in args.attacks:
                phases.append(run_attack(kind, server, b, args, tmp))
                show(phases[-1])
            phases.append(alone("alone (end)"))
            show(phases[-1])
        ok = True
    except BaseException:
        print(f"\nfailed; server log {server.log_path}, last lines:\n{server.tail()}", file=sys.stderr)
        raise
    finally:
        server.stop()
        if ok and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    text = report(args, phases, started, time.perf_counter() - t_start, load0, server.log_path)
    write_report(args.out, text)


if __name__ == "__main__":
    main()
