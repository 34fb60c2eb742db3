"""Clients that follow replicas, against real servers on loopback ports (the digits model):
a list of targets spreads Sample calls over every replica (each server's own request counter);
a replica turned NOT_SERVING gets no new call (health-checked round_robin); a replica killed
mid-run loses no later call; a replica drained under load fails no call at all (NOT_SERVING,
GOAWAY, retries); a bidirectional stream is never re-run elsewhere; a drained replica's
refusals are retried (Trailers-Only); ``--max-connection-age`` GOAWAYs connections while their
calls finish. The server in its own process is killed with SIGKILL."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time

import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2

from _needs import missing

import adjointdpm
import adjointdpm.aio
from adjointdpm_server.__main__ import parse_args
from adjointdpm_server.config import Limits, ServerConfig
from adjointdpm_server.wire import build_server
from adjointdpm_server.wire.server import SERVICE_NAME, connection_options

from reliability._servers import ServerProcess

pytestmark = pytest.mark.timeout(90)

LIMITS = Limits(max_batch=4, max_steps=100, max_iterations=5)


def _serve(tmp_path, name: str, **config):
    config = {"max_active_jobs": 8, "limits": LIMITS, **config}
    return build_server(ServerConfig(models=("digits",), port=0, artifact_dir=tmp_path / name, **config))


def _count(srv, rpc: str, code: str = "OK") -> int:
    value = srv.metrics.registry.get_sample_value("adjointdpm_requests_total", {"rpc": rpc, "code": code})
    return int(value or 0)


def _targets(servers) -> list[str]:
    return [f"127.0.0.1:{s.port}" for s in servers]


def _wait(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replicas")
    servers = [_serve(tmp, f"r{k}") for k in range(3)]
    yield servers
    for s in servers:
        s.stop(0)


def test_a_list_of_targets_spreads_samples_over_every_replica(three):
    before = [_count(s, "Sample") for s in three]
    with adjointdpm.Client(_targets(three), timeout=30) as client:
        client.list_models()  # connected (round_robin picks among the ready replicas)
        time.sleep(0.2)
        for k in range(12):
            assert client.sample(seed=k, steps=2).x0.shape == (1, 1, 8, 8)
    served = [_count(s, "Sample") - b for s, b in zip(three, before)]
    assert sum(served) == 12 and min(served) >= 2, served


def test_the_async_client_spreads_them_too(three):
    before = [_count(s, "Sample") for s in three]

    async def main():
        async with adjointdpm.aio.Client(",".join(_targets(three)), timeout=30) as client:
            await client.list_models()
            await asyncio.sleep(0.2)
            await asyncio.gather(*(client.sample(seed=k, steps=2) for k in range(12)))
    asyncio.run(main())
    served = [_count(s, "Sample") - b for s, b in zip(three, before)]
    assert sum(served) == 12 and min(served) >= 1, served


def test_a_replica_not_serving_gets_no_new_call(three):
    """Client-side health checking: the replica's Health/Watch says NOT_SERVING, round_robin
    leaves it out; SERVING again, it is back."""
    sick = three[1]
    with adjointdpm.Client(_targets(three), timeout=30) as client:
        client.list_models()
        for name in ("", SERVICE_NAME):
            sick.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            time.sleep(0.3)  # the Watch stream's update reaches the client
            before = _count(sick, "Sample")
            for k in range(9):
                client.sample(seed=k, steps=2)
            assert _count(sick, "Sample") == before
        finally:
            for name in ("", SERVICE_NAME):
                sick.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        time.sleep(0.3)
        before = _count(sick, "Sample")
        for k in range(9):
            client.sample(seed=k, steps=2)
        assert _count(sick, "Sample") > before


def test_a_drained_replica_s_refusals_are_retried_but_a_bidi_stream_is_not(tmp_path):
    """A replica whose admission is closed (its drain has begun, health still SERVING) refuses
    with UNAVAILABLE before answering anything: a Sample is retried on the other replica, a
    ComputeGradient (a client loss rides on it) fails there, once, and is not re-run."""
    draining, other = _serve(tmp_path, "d"), _serve(tmp_path, "o")
    try:
        assert draining.service.drain(0.1)
        with adjointdpm.Client(_targets([draining, other]), timeout=30) as client:
            client.list_models()
            for k in range(6):
                client.sample(seed=k, steps=2)
            assert _count(other, "Sample") == 6 and _count(draining, "Sample", "UNAVAILABLE") >= 1
            calls = []

            def loss(x):
                calls.append(1)
                return float(np.square(x).sum()), 2 * x

            failed = 0
            for k in range(6):
                try:
                    client.compute_gradient(adjointdpm.ClientLoss(loss, autograd=False), seed=k, steps=2)
                except adjointdpm.AdjointDPMError as err:
                    assert err.code.name == "UNAVAILABLE" and "shutting down" in err.details
                    failed += 1
        refused = _count(draining, "ComputeGradient", "UNAVAILABLE")
        assert failed >= 1 and failed == refused  # each tried once, on the draining replica
        assert _count(other, "ComputeGradient") == 6 - failed == len(calls)
    finally:
        draining.stop(0)
        other.stop(0)


def test_a_bidi_stream_whose_replica_dies_mid_call_is_not_rerun(tmp_path):
    a, b = _serve(tmp_path, "a"), _serve(tmp_path, "b")
    try:
        asked, stopped = [], []

        def loss(x):
            asked.append(1)
            running = [s for s in (a, b) if s.service.jobs]
            assert len(running) == 1
            running[0].stop(0)  # the replica running this job dies
            stopped.append(running[0])
            return float(x.sum()), np.ones_like(x)

        with adjointdpm.Client(_targets([a, b]), timeout=30) as client:
            client.list_models()
            with pytest.raises(adjointdpm.AdjointDPMError) as err:
                client.compute_gradient(adjointdpm.ClientLoss(loss, autograd=False), seed=0, steps=2)
            assert err.value.code.name in ("UNAVAILABLE", "CANCELLED")
            (dead,) = stopped
            survivor = b if dead is a else a
            assert asked == [1]  # not re-run: the client's loss ran once
            assert _count(survivor, "ComputeGradient") == 0
            assert client.sample(seed=0, steps=2).x0.shape == (1, 1, 8, 8)  # the survivor serves
    finally:
        a.stop(0)
        b.stop(0)


def _load(client, stop: threading.Event, n_threads: int, steps: int):
    """Sample calls in a loop on ``n_threads`` threads: [(start, end, error or None)]."""
    outcomes, lock = [], threading.Lock()

    def run(t):
        k = 0
        while not stop.is_set():
            start = time.monotonic()
            try:
                client.sample(seed=k, steps=steps)
                error = None
            except adjointdpm.AdjointDPMError as err:
                error = err
            with lock:
                outcomes.append((start, time.monotonic(), error))
            k += 1

    threads = [threading.Thread(target=run, args=(t,), daemon=True) for t in range(n_threads)]
    for t in threads:
        t.start()
    return outcomes, threads


def test_draining_a_replica_under_load_fails_no_call(tmp_path):
    """``Server.shutdown`` (SIGTERM) on one of three replicas while four threads call Sample:
    health turns NOT_SERVING, GOAWAY, the calls in flight there finish, the new ones go to the
    other two (a call that raced the GOAWAY is retried there): not one call fails."""
    servers = [_serve(tmp_path, f"d{k}") for k in range(3)]
    drained_one = servers[0]
    try:
        with adjointdpm.Client(_targets(servers), timeout=30) as client:
            client.list_models()
            stop = threading.Event()
            outcomes, threads = _load(client, stop, n_threads=4, steps=4)
            _wait(lambda: _count(drained_one, "Sample") >= 2 and drained_one.service.jobs, 20)
            result, served_before = {}, _count(drained_one, "Sample")
            drain = threading.Thread(target=lambda: result.setdefault("drained", drained_one.shutdown(grace=10)))
            started = time.monotonic()
            drain.start()
            _wait(lambda: sum(1 for s, _, _ in outcomes if s > started + 0.2) >= 6, 30)
            stop.set()
            for t in threads:
                t.join(30)
            drain.join(30)
        errors = [e for _, _, e in outcomes if e is not None]
        assert not errors, errors[:3]
        assert result["drained"] is True
        assert _count(drained_one, "Sample") > served_before  # its calls in flight finished
        assert all(_count(s, "Sample") > 0 for s in servers[1:])
    finally:
        for s in servers:
            s.stop(0)


def test_a_drain_turns_clients_away_first_so_even_bidi_calls_go_elsewhere(tmp_path):
    """A draining replica is left by health-checked clients (NOT_SERVING, then GOAWAY a moment
    later, so no stream races the GOAWAY): while a call in flight there (its client loss held)
    goes on, ComputeGradient calls (never retried) all run on the other replica, a connection
    that is not health-checked is sent GOAWAY (it leaves READY while the held call still runs);
    then the held call finishes."""
    draining, other = _serve(tmp_path, "g0"), _serve(tmp_path, "g1")
    release = threading.Event()

    def held(x):
        release.wait(20)
        return float(x.sum()), np.ones_like(x)

    try:
        with adjointdpm.Client(f"127.0.0.1:{draining.port}", timeout=60) as direct, \
                adjointdpm.Client(_targets([draining, other]), timeout=30) as client, \
                grpc.insecure_channel(f"127.0.0.1:{draining.port}") as bare:
            client.list_models()
            grpc.channel_ready_future(bare).result(timeout=10)
            states = []
            bare.subscribe(states.append)
            long = {}
            runner = threading.Thread(target=lambda: long.setdefault("result", direct.compute_gradient(
                adjointdpm.ClientLoss(held, autograd=False), seed=0, steps=2)))
            runner.start()
            _wait(lambda: draining.service.jobs)
            drain = threading.Thread(target=draining.shutdown, kwargs={"grace": 30})
            drain.start()
            _wait(lambda: not draining.health.Check(
                health_pb2.HealthCheckRequest(), None).status == health_pb2.HealthCheckResponse.SERVING)
            for k in range(6):
                client.compute_gradient(adjointdpm.ClientLoss(lambda x: (float(x.sum()), np.ones_like(x)),
                                                              autograd=False), seed=k, steps=2)
            assert draining.service.jobs  # the held call was in flight all along
            _wait(lambda: any(s != grpc.ChannelConnectivity.READY for s in states[1:]))  # GOAWAY
            assert draining.service.jobs
            release.set()
            runner.join(30)
            drain.join(30)
        assert np.isfinite(long["result"].loss)  # the call in flight finished
        # all six succeeded; one picked in the instant before the client saw NOT_SERVING may have
        # run (whole) on the draining replica, none was refused or cut there
        assert _count(other, "ComputeGradient") >= 5
        assert all(_count(draining, "ComputeGradient", code) == 0 for code in ("UNAVAILABLE", "CANCELLED"))
    finally:
        release.set()
        draining.stop(0)
        other.stop(0)


def test_a_replica_killed_mid_run_loses_no_later_call(tmp_path):
    """SIGKILL one replica (its own process) while Sample calls run on three: every call that
    starts after the kill succeeds (the retry policy and round_robin route around the dead one),
    and so do ListModels calls."""
    victim = ServerProcess(tmp_path / "victim")
    others = [_serve(tmp_path, f"k{k}") for k in range(2)]
    try:
        with adjointdpm.Client([victim.target, *_targets(others)], timeout=30) as client:
            client.list_models()
            stop = threading.Event()
            outcomes, threads = _load(client, stop, n_threads=4, steps=4)
            time.sleep(0.7)
            victim.proc.kill()
            killed = time.monotonic()
            time.sleep(1.0)
            stop.set()
            for t in threads:
                t.join(30)
            later = [e for s, _, e in outcomes if s > killed]
            assert len(later) >= 4 and not [e for e in later if e is not None], later[:3]
            for k in range(6):
                assert client.sample(seed=k, steps=2).x0.shape == (1, 1, 8, 8)
                assert client.list_models()
        # in flight at the kill: a call that had received events is lost (never silently re-run)
        lost = [e for s, _, e in outcomes if e is not None]
        assert all(e.code.name in ("UNAVAILABLE", "CANCELLED", "UNKNOWN") for e in lost)
    finally:
        victim.kill()
        for s in others:
            s.stop(0)


def test_a_token_on_plaintext_still_reaches_every_replica(tmp_path):
    """The server's Health/Watch needs the token: on plaintext the client does not health-check
    (its health calls would carry no token and every replica would look unhealthy)."""
    servers = [_serve(tmp_path, f"t{k}", tokens=("s3cret",)) for k in range(2)]
    try:
        with adjointdpm.Client(_targets(servers), token="s3cret", timeout=30) as client:
            client.list_models()
            time.sleep(0.2)  # both connected
            for k in range(6):
                client.sample(seed=k, steps=2)
        served = [_count(s, "Sample") for s in servers]
        assert sum(served) == 6 and min(served) >= 2, served
    finally:
        for s in servers:
            s.stop(0)


def _pki(d):
    if shutil.which("openssl") is None:
        missing("openssl (Debian's openssl package): the TLS test's certificates")

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
            "-days", "1", "-subj", "/CN=test-ca")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=localhost")
    (d / "server.ext").write_text("subjectAltName=DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "1", "-extfile", "server.ext")
    return d


def test_tls_with_a_token_health_checks_with_the_token(tmp_path):
    """With TLS the token travels as channel credentials, so gRPC's own Health/Watch calls carry
    it too: health checking stays on, and a list of host names is checked against its first."""
    pki = _pki(tmp_path)
    servers = [_serve(tmp_path, f"s{k}", tokens=("s3cret",), tls_cert=pki / "server.crt",
                      tls_key=pki / "server.key") for k in range(2)]
    try:
        targets = [f"localhost:{s.port}" for s in servers]
        tls = {"root_certificates": pki / "ca.crt"}
        with adjointdpm.Client(targets, token="s3cret", tls=tls, timeout=30) as client:
            client.list_models()
            time.sleep(0.2)
            for k in range(6):
                client.sample(seed=k, steps=2)
            sick = servers[0]
            for name in ("", SERVICE_NAME):
                sick.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            time.sleep(0.3)
            before = _count(sick, "Sample")
            for k in range(4):
                client.sample(seed=k, steps=2)
            assert _count(sick, "Sample") == before  # health-checked: the Watch had the token
        served = [_count(s, "Sample") for s in servers]
        assert sum(served) == 10 and served[1] >= 6, served
        with adjointdpm.Client(targets, token="wrong", tls=tls, timeout=5) as client:
            with pytest.raises(adjointdpm.AdjointDPMError) as err:
                client.list_models()
            # the Watch is refused first: every replica unhealthy; the error says why it may be
            assert err.value.code.name == "UNAVAILABLE" and "wrong token" in err.value.details
    finally:
        for s in servers:
            s.stop(0)


# ---- max connection age ----------------------------------------------------------------------

def _client_ports(port: int) -> set[int]:
    """The peer ports of the server's established connections (the server is in this process)."""
    return {c.raddr.port for c in psutil.Process().net_connections(kind="tcp")
            if c.laddr and c.laddr.port == port and c.raddr and c.status == psutil.CONN_ESTABLISHED}


def test_a_connection_older_than_max_connection_age_is_goawayed_while_its_call_finishes(tmp_path):
    aged = _serve(tmp_path, "aged", max_connection_age_s=0.5, max_request_s=20)
    steady = _serve(tmp_path, "steady", max_connection_age_s=0)
    try:
        with adjointdpm.Client(f"127.0.0.1:{aged.port}", timeout=30) as a, \
                adjointdpm.Client(f"127.0.0.1:{steady.port}", timeout=30) as s:
            # a call longer than the age finishes on its GOAWAY'd connection (the grace)
            assert a.sample(seed=0, steps=60).x0.shape == (1, 1, 8, 8)
            seen = {aged.port: set(), steady.port: set()}
            end = time.monotonic() + 1.5
            while time.monotonic() < end:
                a.list_models()
                s.list_models()
                for port in seen:
                    seen[port] |= _client_ports(port)
                time.sleep(0.05)
        assert len(seen[steady.port]) == 1
        assert len(seen[aged.port]) >= 2, seen  # reconnected after each GOAWAY
    finally:
        aged.stop(0)
        steady.stop(0)


def test_the_max_connection_age_flag_reaches_the_server_options():
    config, _ = parse_args(["--max-connection-age", "300", "--max-request-seconds", "3600"])
    assert config.max_connection_age_s == 300
    assert dict(connection_options(config)) == {"grpc.max_connection_age_ms": 300_000,
                                                "grpc.max_connection_age_grace_ms": 3_630_000}
    assert connection_options(ServerConfig(max_connection_age_s=0)) == []
    assert parse_args([])[0].max_connection_age_s == ServerConfig.max_connection_age_s > 0
