"""What the service benchmarks share: the machine's description and stopping a child process."""

from __future__ import annotations

import os
import platform
import subprocess

__all__ = ["cpu_model", "machine", "stop_process"]


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
