"""The coordination store's contract, in this process and in a real Redis: holds, job slots and
job leases, what lapses when a replica dies, what a Redis restart must not break, and quotas
held exactly under racing replicas."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from adjointdpm_server.cluster import JobRecord, LocalCoordination, coordination
from adjointdpm_server.errors import FailedPrecondition, ResourceExhausted, Unavailable
from adjointdpm_server.storage.artifacts import ArtifactStore

LEASE_S = 1.5


@pytest.fixture(params=("local", "redis"))
def replicas(request):
    """``replicas(name)``: a new replica's coordination (all share one store)."""
    made = []
    url = "local" if request.param == "local" else request.getfixturevalue("redis_server").url
    shared = LocalCoordination("only", LEASE_S) if url == "local" else None

    def make(name: str):
        c = shared if shared is not None else coordination(url, name, LEASE_S)
        made.append(c)
        return c

    make.kind = request.param
    yield make
    for c in made:
        c.close()


def _settled(c, within_s: float = LEASE_S):
    """Past the start-up settling of a fresh Redis (half a lease)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return c.ready()
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_holds_count_per_tenant_resize_and_drop(replicas):
    a, b = replicas("a"), replicas("b")
    _settled(a)
    h1, h2, h3 = a.hold("alice", 100), b.hold("alice", 50), b.hold("bob", 7)
    assert (a.held("alice"), a.held("bob"), b.held()) == (150, 7, 157)
    a.resize(h1, 10)
    assert b.held("alice") == 60
    b.drop(h2)
    b.drop(h3)
    assert a.held() == 10
    a.drop(h1)
    assert b.held() == 0


def test_job_slots_stop_at_the_limit_on_every_replica(replicas):
    a, b = replicas("a"), replicas("b")
    _settled(a)
    s1, _ = a.enter("alice", 2)
    s2, _ = b.enter("alice", 2)
    assert s1 and s2
    assert b.enter("alice", 2) == (None, 2) and a.enter("alice", 2) == (None, 2)
    assert a.enter("bob", 2)[0]  # per tenant
    a.leave(s1)
    s3, before = b.enter("alice", 2)
    assert s3 and before == 1
    assert a.enter("alice", None) == ("", 0)  # no limit: no slot taken


def test_a_job_runs_on_one_replica_at_a_time(replicas):
    a, b = replicas("a"), replicas("b")
    _settled(a)
    record = a.claim(JobRecord(id="job-1", tenant="alice", model="digits"))
    assert record.replica == a.replica and record.state == "running"
    with pytest.raises(FailedPrecondition, match=f"running on replica {a.replica}"):
        b.claim(JobRecord(id="job-1", tenant="alice", model="digits"))
    record.checkpoint, record.iteration = "checkpoint-x", 4
    a.update(record)
    seen = b.job("job-1")
    assert (seen.checkpoint, seen.iteration, seen.replica) == ("checkpoint-x", 4, a.replica)
    a.release(record, "stopped")
    assert b.job("job-1").state == "stopped"
    taken = b.claim(b.job("job-1"))
    assert taken.replica == b.replica and b.job("job-1").state == "running"
    assert b.job("job-2") is None


def test_what_a_dead_replica_held_lapses_and_its_job_moves(redis_server):
    """A replica that stops renewing (killed: here, its renewals stop) loses its slots, holds
    and job leases after one lease; another replica then resumes the job, and the first, were
    it alive after all, learns it lost the lease."""
    a = coordination(redis_server.url, "a", LEASE_S)
    b = coordination(redis_server.url, "b", LEASE_S)
    try:
        _settled(a)
        a.claim(JobRecord(id="job-9", tenant="alice"))
        a.enter("alice", 1)
        a.hold("alice", 1000)
        time.sleep(LEASE_S * 0.8)
        assert b.slots("alice") == 1 and b.held() == 1000  # renewed: still there
        with pytest.raises(FailedPrecondition):
            b.claim(JobRecord(id="job-9", tenant="alice"))
        a._stop.set()  # the replica dies: no more renewals
        time.sleep(LEASE_S * 1.4)
        assert b.slots("alice") == 0 and b.held() == 0
        b.claim(JobRecord(id="job-9", tenant="alice"))
        assert not b.lease_lost("job-9")
        a.renew()  # a stalled replica wakes up: the job is not its own any more
        assert a.lease_lost("job-9")
    finally:
        a.close()
        b.close()


def test_a_redis_restart_refuses_new_work_until_replicas_restored_their_state(redis_server):
    """Redis restarts empty: quota-bound work is refused with UNAVAILABLE (never over-admitted
    against a store that forgot the running jobs) until every replica has renewed what it
    holds, then everything is as before."""
    a = coordination(redis_server.url, "a", LEASE_S)
    b = coordination(redis_server.url, "b", LEASE_S)
    try:
        _settled(a)
        slot, _ = a.enter("alice", 1)
        assert slot and b.enter("alice", 1)[0] is None
        redis_server.stop()
        with pytest.raises(Unavailable, match="cannot be reached"):
            b.enter("alice", 1)
        redis_server.start()
        with pytest.raises(Unavailable, match="restarted empty"):
            b.enter("alice", 1)  # the store forgot a's slot; admitting now would over-admit
        _settled(b)
        assert b.enter("alice", 1) == (None, 1)  # a renewed its slot: still full
        a.leave(slot)
        assert b.enter("alice", 1)[0]
    finally:
        a.close()
        b.close()


def test_sixteen_racing_requests_on_three_replicas_get_exactly_the_limit(redis_server):
    nodes = [coordination(redis_server.url, f"r{k}", 10.0) for k in range(3)]
    try:
        _settled(nodes[0], 6)
        barrier = threading.Barrier(16)

        def race(k):
            barrier.wait()
            return nodes[k % 3].enter("alice", 4)[0]

        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(race, range(16)))
        assert sum(1 for s in got if s) == 4 and nodes[1].slots("alice") == 4
    finally:
        for c in nodes:
            c.close()


def test_a_tenant_storage_quota_is_never_exceeded_by_racing_replicas(tmp_path, redis_server):
    """16 saves race from three stores (three replicas on one directory) under a quota that
    fits four: exactly four land, and the bytes stored never exceed the quota."""
    nodes = [coordination(redis_server.url, f"r{k}", 10.0) for k in range(3)]
    try:
        _settled(nodes[0], 6)
        tensor = torch.zeros(2**18)  # 1 MiB
        probe = ArtifactStore(tmp_path / "probe").save("lora", {"w": tensor}, model="m")
        quota = 4 * (probe.size + 64 * 1024 + 4096) + 1000
        stores = [ArtifactStore(tmp_path / "shared", cluster=c, tenant_quota_bytes=quota) for c in nodes]
        barrier = threading.Barrier(16)

        def race(k):
            barrier.wait()
            try:
                return stores[k % 3].save("lora", {"w": tensor}, model="m", tenant="alice").size
            except ResourceExhausted:
                return 0

        with ThreadPoolExecutor(16) as pool:
            sizes = list(pool.map(race, range(16)))
        assert sum(1 for s in sizes if s) == 4
        assert stores[0].usage("alice") <= quota and nodes[0].held() == 0
    finally:
        for c in nodes:
            c.close()


def test_the_coordination_store_s_reachability_and_holdings_are_metrics(redis_server):
    """``adjointdpm_coordination_up`` follows the store (an operator alerts on 0) and
    ``adjointdpm_coordination_held`` counts what this replica holds there."""
    from adjointdpm_server.telemetry.metrics import Metrics

    c = coordination(redis_server.url, "a", LEASE_S)
    metrics = Metrics(device="cpu")
    metrics.watch_cluster(c)
    up = lambda: metrics.registry.get_sample_value("adjointdpm_coordination_up", {"store": c.url})  # noqa: E731

    def within(predicate, seconds=3 * LEASE_S):
        deadline = time.monotonic() + seconds
        while not predicate():
            assert time.monotonic() < deadline
            time.sleep(0.05)

    try:
        c.start()
        _settled(c)
        slot, _ = c.enter("alice", 2)
        assert up() == 1.0
        assert metrics.registry.get_sample_value("adjointdpm_coordination_held", {"kind": "job_slots"}) == 1.0
        redis_server.stop()
        within(lambda: up() == 0.0)
        redis_server.start()
        within(lambda: up() == 1.0)
        c.leave(slot)
        assert metrics.registry.get_sample_value("adjointdpm_coordination_held", {"kind": "job_slots"}) == 0.0
    finally:
        c.close()
