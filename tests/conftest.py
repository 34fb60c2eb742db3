import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _needs import missing

# Two CPU cores in CI: keep each worker single-threaded so xdist workers don't oversubscribe.
os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # the SDK-only tests run without torch
    torch = None


@pytest.fixture
def f64():
    """Run a test in float64 by default (accuracy tests must not drown in float32 noise)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# ---- a real Triton Inference Server (PyTriton's bundled one, on CPU) -----------------------------
# It runs in its own venv (scripts/setup_triton.sh: PyTriton needs numpy<2) and serves
# tests/triton_peer/serve_mse_loss.py; the fixture waits until every model is ready
# (``mse_per_sample``, bound last, once was not).

ROOT = Path(__file__).resolve().parents[1]
TRITON_MODELS = ("mse_loss", "mse_per_sample", "bad_grad", "nan_loss")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, deadline_s: float = 120) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the Triton server exited with {proc.returncode}:\n"
                        f"{log.read_text()[-4000:]}")
        try:
            if client.is_server_ready() and all(client.is_model_ready(m) for m in TRITON_MODELS):
                return
        except Exception:  # not listening yet
            pass
        time.sleep(0.5)
    pytest.fail(f"the Triton server was not ready after {deadline_s} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="session")
def triton_url(tmp_path_factory):
    setup = subprocess.run(["bash", str(ROOT / "scripts/setup_triton.sh")], capture_output=True,
                           text=True, timeout=540)
    if setup.returncode != 0:  # no network, no python3.11, pip failed: say why, then skip
        lines = (setup.stdout + setup.stderr).strip().splitlines()
        print("\n".join(lines[-40:]), file=sys.stderr)
        reason = [line for line in lines if not line.startswith("WARNING:")][-3:] or lines[-3:]
        missing("nvidia-pytriton (scripts/setup_triton.sh failed): " + " | ".join(reason))
    grpc_port, http_port, metrics_port = _free_ports(3)
    log = tmp_path_factory.mktemp("triton") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(ROOT / ".venv-triton/bin/python"), str(ROOT / "tests/triton_peer/serve_mse_loss.py"),
             "--grpc-port", str(grpc_port), "--http-port", str(http_port),
             "--metrics-port", str(metrics_port), "--target", "0.5"],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"127.0.0.1:{grpc_port}"
    try:
        _wait_ready(proc, url, log)
        yield url
    finally:
        proc.terminate()  # the script stops tritonserver and its backend stubs on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def free_ports():
    """``free_ports(n)``: n loopback ports nothing listens on (for a peer that is down)."""
    return _free_ports


# ---- real peers of a multi-replica service: an S3 protocol server and Redis (tests/_stores.py) ---
@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback for the whole session; each test takes its own bucket."""
    from _stores import S3Server

    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3_store(s3_server, monkeypatch):
    """``s3://bucket/prefix`` of a fresh bucket, with the AWS environment pointing at it."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return f"s3://{s3_server.new_bucket()}/artifacts"


@pytest.fixture
def redis_server(tmp_path):
    """A fresh redis-server process of this test's own (it may restart it)."""
    from _stores import RedisServer

    server = RedisServer(tmp_path)
    yield server
    server.stop()
