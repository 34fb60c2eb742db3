"""A server in its own process (for SIGTERM, memory and disconnect tests)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path


class ServerProcess:
    def __init__(self, artifact_dir: Path, *args: str, log: Path | None = None):
        self.log_path = log or artifact_dir.parent / f"server-{time.time_ns()}.log"
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "adjointdpm_server", "--model", "digits", "--port", "0",
             "--artifact-dir", str(artifact_dir), "--log-format", "text", *args],
            stdout=subprocess.PIPE, stderr=open(self.log_path, "w"), text=True, env=env)
        line = self.proc.stdout.readline()
        match = re.search(r"listening on \S+:(\d+)", line)
        if not match:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r}; log: {self.log_path.read_text()[-2000:]}")
        self.port = int(match.group(1))
        self.target = f"127.0.0.1:{self.port}"

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def terminate(self, timeout: float = 60) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
