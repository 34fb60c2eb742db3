"""What the service benchmarks share: the machine's description and stopping a child process."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Cell", "cpu_model", "machine", "stop_process", "launch_server", "run_clients", "write_report"]


@dataclass
class Cell:
    """One measured cell: each request's latency (s), the wall time of the cell, the errors."""

    latencies: list[float] = field(default_factory=list)
    wall: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall if self.wall and self.latencies else float("nan")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "?"


def machine() -> str:
    """CPU model and cores, as the results files print it."""
    return f"{cpu_model()}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable)"


def stop_process(proc: subprocess.Popen, log, *, terminate: bool = True) -> None:
    """End ``proc`` (SIGTERM first unless it is ending by itself; killed after 30 s), close its log."""
    if proc.poll() is None:
        if terminate:
            proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log.close()


def launch_server(args: list[str], log_path: Path, env: dict, cwd=None):
    """``python -m adjointdpm_server ARGS`` with its log in ``log_path``: (process, open log,
    target, metrics URL or None) once it listens; its stdout drained in a thread."""
    log = open(log_path, "w")  # noqa: SIM115 — open as long as the child runs
    proc = subprocess.Popen([sys.executable, "-m", "adjointdpm_server", *args], stdout=subprocess.PIPE,
                            stderr=log, text=True, env=env, cwd=cwd)
    line = proc.stdout.readline()
    if "listening on" not in line:
        stop_process(proc, log)
        tail = "\n".join(Path(log_path).read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"the server did not start (first line {line!r}); log:\n{tail}")
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    found = re.search(r"metrics: (\d+)\)", Path(log_path).read_text())
    metrics = f"http://127.0.0.1:{found.group(1)}/metrics" if found else None
    return proc, log, line.rsplit(" ", 1)[1].strip(), metrics


def run_clients(target: str, clients: int, per_client: int, send, cell: Cell) -> Cell:
    """``clients`` threads, each its own ``adjointdpm.Client`` (connected before the clock
    starts), sending ``per_client`` requests back to back — ``send(client, k, j)`` is client k's
    request j — from one start barrier; ``cell`` gets each latency, each error and the wall time
    from the barrier to the last result."""
    import time

    import adjointdpm

    lock = threading.Lock()
    pool = [adjointdpm.Client(target) for _ in range(clients)]
    for c in pool:
        c.list_models()
    barrier = threading.Barrier(clients + 1)

    def worker(k: int) -> None:
        barrier.wait()
        for j in range(per_client):
            t0 = time.perf_counter()
            try:
                send(pool[k], k, j)
            except Exception as err:  # noqa: BLE001 — reported in the tables
                with lock:
                    cell.errors.append(f"{type(err).__name__}: {err}")
                continue
            with lock:
                cell.latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    cell.wall = time.perf_counter() - t0
    for c in pool:
        c.close()
    return cell


def write_report(path: Path, text: str) -> None:
    """Print ``text`` (a results page) and write it to ``path``."""
    print("\n" + text)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    print(f"wrote {path}")
