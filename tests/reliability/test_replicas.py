"""N replicas as one service: three server processes on one artifact store — a directory, and an
S3 bucket on moto's real S3 server — coordinated through a real Redis.

What an operator and their users count on, each a scenario here: an adapter trained on one
replica serves from another; a replica SIGKILLed mid-fine-tune loses nothing — the job resumes
by id on another replica, never on two at once; a replica that starts during a write leaves it
alone; a deletion on one is NOT_FOUND on all; a tenant's job and byte quotas hold exactly under
16 racing requests spread over the replicas; a Redis restart refuses quota-bound work with
UNAVAILABLE (never over-admits) and recovers.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import adjointdpm
from _stores import RedisServer

LEASE_S = 3.0
TENANTS = [f"t{k}" for k in range(8)]
TO_EIGHT = adjointdpm.ServerLoss("classifier", params={"label": 8})
EXAMPLES = [{"seed": k, "label": k} for k in range(2)]
FINETUNE = dict(lr=5e-3, steps=4, lora_rank=2)
RESERVATIONS_IN_QUOTA = 2.5  # the byte quota fits two running fine-tunes' reservations, not three


def _reservation_bytes() -> int:
    """What one fine-tune of FINETUNE reserves up front (its checkpoints and adapter)."""
    from adjointdpm_server.models import load_model
    from adjointdpm_server.models._adapters import with_lora
    from adjointdpm_server.tasks.finetune_weights import _reserved_bytes

    backend = load_model("digits")
    model = with_lora(backend.eps_fn, FINETUNE["lora_rank"], None, backend.lora_targets)
    return _reserved_bytes([p for p in model.parameters() if p.requires_grad], 3)


class Replica:
    """One ``adjointdpm-server`` process of the cluster."""

    def __init__(self, name: str, args: list[str], env: dict, log: Path):
        self.name, self.log = name, log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "adjointdpm_server", "--model", "digits", "--port", "0",
             "--log-format", "text", "--replica-id", name, *args],
            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=env)
        self.target = None

    def wait_listening(self) -> "Replica":
        line = self.proc.stdout.readline()
        match = re.search(r"listening on \S+:(\d+)", line)
        if not match:
            self.proc.kill()
            raise RuntimeError(f"replica {self.name} did not start: {self.log.read_text()[-2000:]}")
        self.target = f"127.0.0.1:{match.group(1)}"
        return self

    def client(self, tenant: str, timeout: float = 120) -> adjointdpm.Client:
        return adjointdpm.Client(self.target, token=f"tok-{tenant}", timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Cluster:
    def __init__(self, root: Path, store: str, env: dict, redis: RedisServer, quota_mib: float):
        tokens = root / "tokens"
        tokens.write_text("".join(f"{t}:tok-{t}\n" for t in TENANTS))
        self.root, self.env, self.redis = root, env, redis
        self.args = ["--artifact-dir", str(root / "artifacts"), "--coordination", redis.url,
                     "--lease-seconds", str(LEASE_S), "--tokens-file", str(tokens),
                     "--tenant-max-jobs", "3", "--tenant-storage-mib", f"{quota_mib:.6f}",
                     "--max-active-jobs", "32", "--max-queue", "32"]
        if store.startswith("s3://"):
            self.args += ["--artifact-store", store]
        self.replicas: dict[str, Replica] = {}

    def start(self, *names: str) -> list[Replica]:
        started = [Replica(n, self.args, self.env, self.root / f"{n}.log") for n in names]
        for r in started:  # the processes start in parallel
            self.replicas[r.name] = r.wait_listening()
        return started

    def stop(self) -> None:
        for r in self.replicas.values():
            r.kill()


@pytest.fixture(scope="module", params=("directory", "s3"))
def cluster(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"cluster-{request.param}")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    store = str(root / "artifacts")
    if request.param == "s3":
        s3 = request.getfixturevalue("s3_server")
        env.update(s3.env)
        store = f"s3://{s3.new_bucket()}/artifacts"
    redis = RedisServer(root)
    c = Cluster(root, store, env, redis, RESERVATIONS_IN_QUOTA * _reservation_bytes() / 2**20)
    try:
        c.start("a", "b", "c")
        yield c
    finally:
        c.stop()
        redis.stop()


def _when_settled(call, within_s: float = 2 * LEASE_S):
    """``call()`` once the coordination store admits work (a fresh Redis settles for half a
    lease); its UNAVAILABLE meanwhile is the promised refusal."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return call()
        except adjointdpm.AdjointDPMError as err:
            if err.code.name != "UNAVAILABLE" or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _settled(cluster) -> None:
    """Wait until the coordination store admits work (one cheap call answers)."""
    replica = next(r for r in cluster.replicas.values() if r.proc.poll() is None)
    _when_settled(lambda: replica.client("t7").sample(labels=[1], seed=0, steps=2))


def test_an_adapter_trained_on_one_replica_serves_on_another_and_a_deletion_is_seen_by_all(cluster):
    a, b, c = (cluster.replicas[n] for n in "abc")
    result = _when_settled(lambda: a.client("t0").finetune_weights(
        TO_EIGHT, EXAMPLES, iterations=2, **FINETUNE))
    adapter = result.artifact.id
    on_b = b.client("t0").sample(labels=[8], seed=3, steps=4, adapter=adapter)
    on_c = c.client("t0").sample(labels=[8], seed=3, steps=4, adapter=adapter)
    assert np.array_equal(on_b.x0, on_c.x0)
    info, data = c.client("t0").download_artifact(adapter)
    assert info.id == adapter and len(data) == info.size
    with pytest.raises(adjointdpm.AdjointDPMError) as other:
        b.client("t1").sample(labels=[8], seed=3, steps=4, adapter=adapter)
    assert other.value.code.name == "NOT_FOUND"  # another tenant's, on any replica
    b.client("t0").delete_artifact(adapter)
    for replica in (a, c):
        for call in (lambda: replica.client("t0").download_artifact(adapter),
                     lambda: replica.client("t0").sample(labels=[8], seed=3, steps=4, adapter=adapter)):
            with pytest.raises(adjointdpm.AdjointDPMError) as gone:
                call()
            assert gone.value.code.name == "NOT_FOUND"


def test_a_killed_replica_s_job_resumes_by_id_on_another_never_on_two(cluster):
    """SIGKILL the replica mid-fine-tune: the client's error names the job; while the dead
    replica's lease lasts no one else takes it, then another replica continues it from its
    newest checkpoint to the same history; a replica started during the resumed run's
    checkpoint writes removes none of them."""
    a, b = cluster.replicas["a"], cluster.replicas["b"]
    client = a.client("t2")
    _settled(cluster)  # a stream refuses when first read, not when opened: settle first
    call = client.finetune_weights(TO_EIGHT, EXAMPLES, iterations=12, checkpoint_every=1, stream=True,
                                   **FINETUNE)
    history = []
    with pytest.raises(adjointdpm.JobInterrupted) as lost:
        for event in call:
            if event.WhichOneof("kind") == "iteration":
                history.append(event.iteration.loss)
            if event.WhichOneof("kind") == "checkpoint" and event.checkpoint.iteration == 2:
                with pytest.raises(adjointdpm.AdjointDPMError) as busy:  # A runs it: not B too
                    b.client("t2").finetune_weights(TO_EIGHT, EXAMPLES, iterations=12,
                                                    resume_job=call.job_id, **FINETUNE)
                assert busy.value.code.name == "FAILED_PRECONDITION"
                assert "running on replica a" in busy.value.details
            if event.WhichOneof("kind") == "checkpoint" and event.checkpoint.iteration == 3:
                a.kill()
    job = lost.value.job_id
    assert job == call.job_id and job.startswith("job-")
    with pytest.raises(adjointdpm.AdjointDPMError) as foreign:
        b.client("t3").finetune_weights(TO_EIGHT, EXAMPLES, iterations=12, resume_job=job, **FINETUNE)
    assert foreign.value.code.name == "NOT_FOUND"  # another tenant's job: as if missing

    fourth = []
    resumed = b.client("t2").finetune_weights(
        TO_EIGHT, EXAMPLES, iterations=12, checkpoint_every=1, resume_job=job, stream=True, **FINETUNE)
    deadline = time.monotonic() + 4 * LEASE_S
    while True:  # A's lease lapses within one lease of its death
        try:
            for event in resumed:
                if event.WhichOneof("kind") == "checkpoint" and not fourth:
                    fourth = cluster.start("d")  # a new replica's sweep, mid-write
            break
        except adjointdpm.AdjointDPMError as err:
            assert err.code.name == "FAILED_PRECONDITION" and time.monotonic() < deadline, err
            time.sleep(0.3)
            resumed = b.client("t2").finetune_weights(
                TO_EIGHT, EXAMPLES, iterations=12, checkpoint_every=1, resume_job=job, stream=True,
                **FINETUNE)
    result = resumed.result
    assert resumed.job_id == job and resumed.job.iteration >= 3  # a 4th may have landed before the kill
    assert len(result.history) == 12 and result.history[:3] == pytest.approx(history[:3], rel=1e-6)
    assert fourth and "swept" not in fourth[0].log.read_text()
    kept = [i for i in b.client("t2").list_models()[0].get("adapters", []) if i["kind"] == "checkpoint"]
    assert len(kept) == 3  # keep_checkpoints: the dead run's and the resumed run's, pruned as one
    for info in kept:
        cluster.replicas["c"].client("t2").download_artifact(info["id"])  # whole, sha256 checked
    with pytest.raises(adjointdpm.AdjointDPMError) as done:
        b.client("t2").finetune_weights(TO_EIGHT, EXAMPLES, iterations=12, resume_job=job, **FINETUNE)
    assert done.value.code.name == "FAILED_PRECONDITION" and result.artifact.id in done.value.details


def _finetune(client):
    return client.finetune_weights(TO_EIGHT, EXAMPLES, iterations=500, stream=True, **FINETUNE), "job"


def _optimize(client):
    """A long job that writes no artifact (only a job slot)."""
    return client.optimize_latent(TO_EIGHT, labels=[1], seed=0, steps=4, iterations=500,
                                  stream=True), "iteration"


def _race(cluster, tenant: str, n: int = 16, job=_finetune):
    """``n`` long jobs of ``tenant`` at once, spread over the live replicas: (the calls that
    started, the refusals' codes and messages, every call)."""
    replicas = [r for r in cluster.replicas.values() if r.proc.poll() is None]
    barrier, started, refused, calls, alive = threading.Barrier(n), [], [], [], []
    lock = threading.Lock()

    def one(k):
        client = replicas[k % len(replicas)].client(tenant)
        barrier.wait()
        call, first = job(client)
        events = iter(call)  # kept alive: a dropped iterator would end the call
        with lock:
            calls.append(call)
            alive.append(events)
        try:
            for event in events:
                if event.WhichOneof("kind") == first:
                    with lock:
                        started.append(call)
                    return
        except adjointdpm.AdjointDPMError as err:
            with lock:
                refused.append((err.code.name, err.details))

    with ThreadPoolExecutor(n) as pool:
        list(pool.map(one, range(n)))
    calls.append(alive)  # (held until the caller cancels)
    return started, refused, calls


def _cancel(calls) -> None:
    for call in calls:
        if isinstance(call, list):
            continue
        call.cancel()


def test_a_tenant_s_job_and_byte_quotas_hold_exactly_across_replicas(cluster):
    # jobs: --tenant-max-jobs 3 on each replica, one count for the cluster
    _settled(cluster)
    started, refused, calls = _race(cluster, "t4", job=_optimize)
    try:
        assert len(started) == 3, refused
        assert len(refused) == 13 and {code for code, _ in refused} == {"RESOURCE_EXHAUSTED"}
        assert all("on every replica" in details for _, details in refused)
    finally:
        _cancel(calls)
    # bytes: the quota fits two fine-tunes' reservations
    time.sleep(1.0)  # the cancelled jobs' slots and holds go
    started, refused, calls = _race(cluster, "t5")
    try:
        assert len(started) == 2, refused
        assert any("storage quota" in d for _, d in refused) and len(refused) == 14
    finally:
        _cancel(calls)


def test_a_redis_restart_refuses_quota_bound_work_then_recovers_without_over_admitting(cluster):
    a, b = cluster.replicas["b"], cluster.replicas["c"]
    def start():  # a stream refuses when first read, not when opened: wait for its job event
        stream = a.client("t6").finetune_weights(TO_EIGHT, EXAMPLES, iterations=500, stream=True, **FINETUNE)
        events = iter(stream)
        while next(events).WhichOneof("kind") != "job":
            pass
        return stream, events  # kept: a dropped event iterator cancels its call
    running, _events = _when_settled(start)
    cluster.redis.stop()
    try:
        once = adjointdpm.Client(b.target, token="tok-t6", timeout=30,
                                 options=[("grpc.enable_retries", 0)])  # see the refusal itself
        with pytest.raises(adjointdpm.AdjointDPMError) as down:
            once.sample(labels=[1], seed=0, steps=3)
        assert down.value.code.name == "UNAVAILABLE" and "coordination store" in down.value.details
    finally:
        cluster.redis.start()
    # the running job's slot is restored by its replica's renewal before anything is admitted:
    # 2 more fit (limit 3), never 3
    _settled(cluster)
    started, refused, calls = _race(cluster, "t6", n=6, job=_optimize)
    try:
        assert len(started) == 2 and len(refused) == 4, refused
    finally:
        _cancel(calls + [running])
    assert b.client("t7").sample(labels=[1], seed=0, steps=3).x0.shape == (1, 1, 8, 8)
