"""Operations over real loopback servers: bearer tokens, TLS and mTLS, the bounded queue with
positions, deadlines, Prometheus metrics, request IDs, durable fine-tunes and graceful drain."""

import shutil
import subprocess
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from _needs import missing
from grpc_health.v1 import health_pb2, health_pb2_grpc

import adjointdpm
from adjointdpm_server.config import Limits, ServerConfig
from adjointdpm_server.wire import build_server

MSE = adjointdpm.ServerLoss("mse", tensors={"target": np.zeros((1, 8, 8), np.float32)})
TO_EIGHT = adjointdpm.ServerLoss("classifier", params={"label": 8})


def _server(tmp_path, **kw):
    kw.setdefault("limits", Limits(max_batch=16, max_steps=500, max_iterations=200))
    return build_server(ServerConfig(models=("digits",), port=0, artifact_dir=tmp_path / "artifacts", **kw))


def _code(fn, *a, **kw):
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        fn(*a, **kw)
    return err.value.code.name


def test_bearer_tokens(tmp_path):
    srv = _server(tmp_path, tokens=("s3cret", "other"), health_port=0)
    try:
        target = f"127.0.0.1:{srv.port}"
        assert _code(adjointdpm.Client(target).sample, seed=0, steps=2) == "UNAUTHENTICATED"
        assert _code(adjointdpm.Client(target, token="wrong").list_models) == "UNAUTHENTICATED"
        assert _code(adjointdpm.Client(target, token="s3cre").compute_gradient, MSE, seed=0, steps=2) == "UNAUTHENTICATED"
        assert adjointdpm.Client(target, token="other").sample(seed=0, steps=2).x0.shape == (1, 1, 8, 8)
        for port in (srv.port, srv.health_port):  # health stays open, on both ports
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        srv.stop(0)


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if shutil.which("openssl") is None:
        missing("openssl: cannot make test certificates")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "1", "-subj", "/CN=test-ca", cwd=d)
    for name, cn in (("server", "localhost"), ("client", "client")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={cn}", cwd=d)
        (d / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "1", "-extfile", f"{name}.ext", cwd=d)
    return d


def test_tls_and_mutual_tls(tmp_path, pki):
    srv = _server(tmp_path, tls_cert=pki / "server.crt", tls_key=pki / "server.key",
                  tls_client_ca=pki / "ca.crt")
    try:
        target = f"localhost:{srv.port}"
        mtls = {"root_certificates": pki / "ca.crt", "private_key": pki / "client.key",
                "certificate_chain": pki / "client.crt"}
        assert adjointdpm.Client(target, tls=mtls).sample(seed=0, steps=2).x0.shape == (1, 1, 8, 8)
        assert _code(adjointdpm.Client(target, tls={"root_certificates": pki / "ca.crt"}, timeout=10)
                     .list_models) == "UNAVAILABLE"  # no client certificate: handshake refused
        assert _code(adjointdpm.Client(target, timeout=10).list_models) == "UNAVAILABLE"  # plaintext
    finally:
        srv.stop(0)


def test_queue_positions_full_queue_and_deadlines(tmp_path):
    srv = _server(tmp_path, max_active_jobs=1, max_queue=2)
    try:
        client = adjointdpm.Client(f"127.0.0.1:{srv.port}")
        long = client.optimize_latent(MSE, iterations=200, seed=0, steps=30, stream=True)
        events = iter(long)  # keep the iterator: dropping it abandons (cancels) the call
        first = next(events)  # it runs (a progress event arrived)
        assert first.WhichOneof("kind") in ("progress", "queued")
        positions, results = [], {}

        def waiter(key):
            call = client.sample(seed=1, steps=2, stream=True)
            for event in call:
                if event.WhichOneof("kind") == "queued":
                    positions.append(event.queued.position)
            results[key] = call.result

        threads = [threading.Thread(target=waiter, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        deadline = time.time() + 20
        while srv.service.admission.queued < 2 and time.time() < deadline:
            time.sleep(0.02)
        assert srv.service.admission.queued == 2
        assert _code(client.sample, seed=2, steps=2) == "RESOURCE_EXHAUSTED"
        short = adjointdpm.Client(f"127.0.0.1:{srv.port}", timeout=0.5)
        assert _code(short.sample, seed=3, steps=2) in ("DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")
        long.cancel()
        with pytest.raises(adjointdpm.AdjointDPMError):
            for _ in events:
                pass
        for t in threads:
            t.join(60)
        assert set(results) == {0, 1}
        assert 1 in positions and 2 in positions and positions.count(0) == 2
    finally:
        srv.stop(0)


def test_metrics_and_request_ids(tmp_path):
    srv = _server(tmp_path, metrics_port=0)
    try:
        client = adjointdpm.Client(f"127.0.0.1:{srv.port}")
        client.compute_gradient(MSE, seed=0, steps=4, grad_mode="checkpoint")  # a backward NFE per step
        _code(client.sample, model="nope")
        text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
        assert 'adjointdpm_requests_total{code="OK",rpc="ComputeGradient"} 1.0' in text
        assert 'adjointdpm_requests_total{code="NOT_FOUND",rpc="Sample"} 1.0' in text
        assert 'adjointdpm_nfe_total{phase="forward"} 4.0' in text
        assert 'adjointdpm_nfe_total{phase="backward"} 4.0' in text
        assert "adjointdpm_request_duration_seconds_bucket" in text
        assert "adjointdpm_queue_duration_seconds_count" in text
        assert "adjointdpm_jobs_running 0.0" in text and "adjointdpm_jobs_queued 0.0" in text
        assert "adjointdpm_accelerator_memory_peak_bytes" in text
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            from adjointdpm.v1 import adjointdpm_pb2 as pb
            from adjointdpm.v1 import adjointdpm_pb2_grpc as pb_grpc
            _, call = pb_grpc.AdjointDPMServiceStub(ch).ListModels.with_call(
                pb.ListModelsRequest(), metadata=(("x-request-id", "req-42"),), timeout=10)
            assert ("x-request-id", "req-42") in call.initial_metadata()
    finally:
        srv.stop(0)


def test_resumed_fine_tune_equals_an_uninterrupted_one(tmp_path):
    srv = _server(tmp_path)
    try:
        client = adjointdpm.Client(f"127.0.0.1:{srv.port}")
        examples = [{"seed": k, "label": k} for k in range(3)]
        args = dict(iterations=4, lr=5e-3, steps=4, lora_rank=2)
        whole = client.finetune_weights(TO_EIGHT, examples, checkpoint_every=2, stream=True, **args)
        whole.wait()
        (ckpt,) = whole.checkpoints
        assert ckpt.iteration == 2
        resumed = client.finetune_weights(TO_EIGHT, examples, resume_from=ckpt.id, **args)
        assert resumed.history == pytest.approx(whole.result.history, rel=1e-6)
        from safetensors.numpy import load
        a = load(client.download_artifact(whole.result.artifact.id)[1])
        b = load(client.download_artifact(resumed.artifact.id)[1])
        assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], atol=1e-6) for k in a)
        assert _code(client.finetune_weights, TO_EIGHT, examples, resume_from=ckpt.id,
                     **{**args, "lora_rank": 3}) == "FAILED_PRECONDITION"
    finally:
        srv.stop(0)


def test_graceful_drain_checkpoints_a_running_fine_tune(tmp_path):
    srv = _server(tmp_path)
    try:
        client = adjointdpm.Client(f"127.0.0.1:{srv.port}")
        call = client.finetune_weights(TO_EIGHT, [{"seed": 0, "label": 1}], iterations=200, steps=10,
                                       lr=1e-3, stream=True)
        events = iter(call)
        while next(events).WhichOneof("kind") != "iteration":
            pass
        drained = srv.shutdown(grace=0.5)
        assert not drained  # 200 iterations do not fit in the grace period
        with pytest.raises(adjointdpm.AdjointDPMError):
            for _ in events:
                pass
        checkpoints = srv.runtime.artifacts.list(kind="checkpoint")
        assert checkpoints and checkpoints[-1].iteration >= 1
    finally:
        srv.stop(0)  # a no-op after the shutdown above; stops the server when an assert failed


def test_round_robin_client_over_a_dns_target(tmp_path):
    """The SDK's load-balancing option works with a dns:/// target (the headless-Service setup)."""
    srv = _server(tmp_path)
    try:
        client = adjointdpm.Client(f"dns:///127.0.0.1:{srv.port}", load_balancing="round_robin")
        assert client.sample(seed=0, steps=2).x0.shape == (1, 1, 8, 8)
    finally:
        srv.stop(0)


def test_only_health_check_is_open_without_a_token(tmp_path):
    """Watch is a long stream that holds a handler thread: it needs a token like everything else."""
    srv = _server(tmp_path, tokens=("s3cret",))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as err:
                next(iter(stub.Watch(health_pb2.HealthCheckRequest(), timeout=10)))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        srv.stop(0)
