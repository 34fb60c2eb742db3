"""A server in its own process (for SIGTERM, memory and disconnect tests), and a hostile
client's stream that never answers its loss query."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

from adjointdpm.v1 import adjointdpm_pb2 as pb
from adjointdpm.v1 import adjointdpm_pb2_grpc as pb_grpc


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


class SilentGradient:
    """A raw ComputeGradient stream whose client loss is asked for and never answered (the
    request stream stays open): the job parks until the client-loss timeout. ``code`` is the
    status the stream ended with (None while open)."""

    def __init__(self, channel, token: str | None = None, steps: int = 3, timeout: float = 600):
        self.hold, self.asked, self.code, self.details = threading.Event(), threading.Event(), None, ""
        request = pb.GradientSpec(generation=pb.Generation(labels=[1], seed=0, steps=steps),
                                     losses=[pb.LossTerm(client="never", weight=1.0)])

        def requests():
            yield pb.ComputeGradientRequest(spec=request)
            self.hold.wait()  # say nothing more, keep the stream open

        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.call = pb_grpc.AdjointDPMServiceStub(channel).ComputeGradient(requests(), metadata=metadata,
                                                                    timeout=timeout)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        try:
            for event in self.call:
                if event.WhichOneof("kind") == "loss_query":
                    self.asked.set()
            self.code = "OK"
        except grpc.RpcError as err:
            self.code, self.details = err.code().name, err.details() or ""
        finally:
            self.asked.set()
            self.hold.set()

    def close(self):
        self.call.cancel()
        self.hold.set()
