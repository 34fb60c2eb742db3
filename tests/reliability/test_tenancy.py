"""Tenants kept apart, quotas checked before writing, health that never locks out, a full disk
that hurts nobody's earlier work — and a hostile tenant beside a well-behaved one."""

from __future__ import annotations

import collections
import os
import re
import statistics
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import adjointdpm
from adjointdpm.v1 import adjointdpm_pb2 as pb
from adjointdpm.v1 import adjointdpm_pb2_grpc as pb_grpc
from adjointdpm_server.cluster import LocalCoordination
from adjointdpm_server.storage.artifacts import ArtifactStore
from adjointdpm_server.wire.auth import Tenants
from adjointdpm_server.config import Limits, ServerConfig
from adjointdpm_server.wire import build_server

from ._servers import SilentGradient

LIMITS = Limits(max_batch=16, max_steps=100, max_iterations=20, client_loss_timeout_s=20)
EXAMPLES = [{"seed": k, "label": k} for k in range(2)]


def _server(tmp_path, **kw):
    kw.setdefault("tokens", ("alice:token-a", "bob:token-b"))
    return build_server(ServerConfig(models=("digits",), port=0, artifact_dir=tmp_path / "artifacts",
                                     limits=LIMITS, **kw))


def _code(fn) -> tuple[str, str]:
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        fn()
    return err.value.code.name, err.value.details


def test_token_entries_name_their_tenant():
    tenants = Tenants(["alice:ta", "tb", "not a tenant:tc", "bob:x:y"])
    assert tenants.tenant_of("ta") == "alice"
    assert tenants.tenant_of("tb") == "default"
    assert tenants.tenant_of("not a tenant:tc") == "default"  # not TENANT:TOKEN: a bare token
    assert tenants.tenant_of("x:y") == "bob"
    assert tenants.tenant_of("alice:ta") is None and tenants.tenant_of("") is None
    assert tenants.names == ["alice", "bob", "default"]


def test_another_tenants_artifacts_are_not_found_everywhere(tmp_path):
    srv = _server(tmp_path)
    target = f"127.0.0.1:{srv.port}"
    try:
        with adjointdpm.Client(target, token="token-a", timeout=120) as a, \
                adjointdpm.Client(target, token="token-b", timeout=120) as b:
            classifier = adjointdpm.ServerLoss("classifier", {"label": 3})
            tuned = a.finetune_weights(classifier, EXAMPLES, iterations=2, steps=3, lora_rank=2,
                                       checkpoint_every=1)
            emb = a.optimize_embedding([classifier], iterations=1, steps=3, labels=1)
            grads = a.compute_gradient(classifier, targets=["weights"], weights={"lora_rank": 2},
                                       labels=1, steps=3)
            mine = [tuned.artifact.id, tuned.checkpoints[0].id, emb.artifact.id,
                    grads.weights_artifact.id]
            # the owner sees and uses all of them
            listed = {x["id"] for m in a.list_models() for x in m["adapters"]}
            assert {tuned.artifact.id, emb.artifact.id, tuned.checkpoints[0].id} <= listed
            for artifact in mine:
                a.download_artifact(artifact)
            a.sample(labels=1, steps=3, adapter=tuned.artifact.id)
            a.sample(steps=3, embedding=emb.artifact.id)
            # the other tenant: indistinguishable from missing ones
            assert not {x["id"] for m in b.list_models() for x in m["adapters"]} & set(mine)
            missing = "lora-" + "0" * 32
            want = _code(lambda: b.download_artifact(missing))
            assert want[0] == "NOT_FOUND"
            for artifact in mine:
                got = _code(lambda: b.download_artifact(artifact))
                assert (got[0], got[1].replace(artifact, missing)) == want
            for call in (lambda: b.sample(labels=1, steps=3, adapter=tuned.artifact.id),
                         lambda: b.sample(steps=3, embedding=emb.artifact.id),
                         lambda: b.finetune_weights(classifier, EXAMPLES, iterations=3, steps=3,
                                                    lora_rank=2, resume_from=tuned.checkpoints[0].id)):
                assert _code(call)[0] == "NOT_FOUND"
    finally:
        srv.stop(0)


def test_a_cancelled_fine_tunes_checkpoint_is_listed_for_its_tenant(tmp_path):
    """The checkpoint written when the client cancels never reaches that client's stream: its
    tenant finds it in ListModels (and can resume from it); the other tenant does not."""
    srv = _server(tmp_path)
    target = f"127.0.0.1:{srv.port}"
    try:
        with adjointdpm.Client(target, token="token-a", timeout=120) as a, \
                adjointdpm.Client(target, token="token-b", timeout=120) as b:
            call = a.finetune_weights(adjointdpm.ServerLoss("classifier", {"label": 3}), EXAMPLES,
                                      iterations=20, steps=3, lora_rank=2, stream=True)
            done = 0
            for event in call:
                done += event.WhichOneof("kind") == "iteration"
                if done == 2:
                    call.cancel()
                    break
            deadline = time.time() + 30
            found = []
            while not found and time.time() < deadline:
                found = [x for m in a.list_models() for x in m["adapters"] if x["kind"] == "checkpoint"]
                time.sleep(0.1)
            assert len(found) == 1 and found[0]["iteration"] >= 2
            assert not [x for m in b.list_models() for x in m["adapters"] if x["kind"] == "checkpoint"]
            resumed = a.finetune_weights(adjointdpm.ServerLoss("classifier", {"label": 3}), EXAMPLES,
                                         iterations=found[0]["iteration"] + 1, steps=3, lora_rank=2,
                                         resume_from=found[0]["id"])
            assert len(resumed.history) == found[0]["iteration"] + 1
    finally:
        srv.stop(0)


def test_shared_artifacts_opt_out(tmp_path):
    srv = _server(tmp_path, shared_artifacts=True)
    target = f"127.0.0.1:{srv.port}"
    try:
        with adjointdpm.Client(target, token="token-a", timeout=120) as a, \
                adjointdpm.Client(target, token="token-b", timeout=120) as b:
            tuned = a.finetune_weights(adjointdpm.ServerLoss("classifier", {"label": 3}), EXAMPLES,
                                       iterations=1, steps=3, lora_rank=2)
            info, data = b.download_artifact(tuned.artifact.id)
            assert info.id == tuned.artifact.id and len(data) > 0
            b.sample(labels=1, steps=3, adapter=tuned.artifact.id)
    finally:
        srv.stop(0)


def test_tenant_job_quota(tmp_path):
    srv = _server(tmp_path, tenant_max_jobs=2)
    target = f"127.0.0.1:{srv.port}"
    try:
        with grpc.insecure_channel(target) as channel, \
                adjointdpm.Client(target, token="token-a", timeout=60) as a, \
                adjointdpm.Client(target, token="token-b", timeout=60) as b:
            held = [SilentGradient(channel, "token-a") for _ in range(2)]
            assert all(h.asked.wait(30) for h in held) and all(h.code is None for h in held)
            with pytest.raises(adjointdpm.AdjointDPMError) as refused:
                a.sample(labels=1, steps=3)
            assert refused.value.code.name == "RESOURCE_EXHAUSTED"
            assert "job quota is full: 2 of 2" in refused.value.details
            assert "per-tenant limit" in refused.value.details
            assert refused.value.retry_after is not None and refused.value.retry_after > 0
            b.sample(labels=1, steps=3)  # another tenant is not affected
            for h in held:
                h.close()
            deadline = time.time() + 20
            while srv.service.jobs and time.time() < deadline:
                time.sleep(0.05)
            a.sample(labels=1, steps=3)  # the quota frees with the jobs
    finally:
        srv.stop(0)


def test_storage_quota_refuses_before_writing_and_keep_checkpoints_prunes(tmp_path):
    srv = _server(tmp_path, tenant_storage_mib=4.0)
    target = f"127.0.0.1:{srv.port}"
    store = srv.runtime.artifacts
    try:
        with adjointdpm.Client(target, token="token-a", timeout=120) as a:
            loss = adjointdpm.ServerLoss("classifier", {"label": 3})
            calls = sum(srv.runtime.engine.stats.calls.values())
            code, details = _code(lambda: a.finetune_weights(loss, EXAMPLES, method="full",
                                                             iterations=20, checkpoint_every=1, steps=3))
            assert code == "RESOURCE_EXHAUSTED"
            assert re.search(r"tenant storage quota: [\d.]+ MiB used of 4.0 MiB; this artifact needs", details)
            assert sum(srv.runtime.engine.stats.calls.values()) == calls  # refused before any work
            assert store.list(tenant="alice") == []
            tuned = a.finetune_weights(loss, EXAMPLES, iterations=5, checkpoint_every=1, steps=3,
                                       lora_rank=2, keep_checkpoints=2)
            assert len(tuned.checkpoints) == 4  # iterations 1…4 (the 5th is the adapter)
            kept = {i.id for i in store.list(kind="checkpoint", tenant="alice")}
            assert kept == {c.id for c in tuned.checkpoints[-2:]}
            assert store.usage("alice") <= 4 * 2**20
    finally:
        srv.stop(0)


def _server_with_file_size_limit(artifact_dir, limit_bytes, log):
    # The limit is set by a fresh interpreter that then execs the server: a ``preexec_fn`` would run
    # Python in a fork of this (gRPC-threaded) process, where gRPC's fork handlers can kill the child.
    limited = ("import os, resource, signal, sys; "
               "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "  # a write past the limit fails with EFBIG
               f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes})); "
               "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")
    proc = subprocess.Popen(
        [sys.executable, "-c", limited, "-m", "adjointdpm_server", "--model", "digits", "--port", "0",
         "--artifact-dir", str(artifact_dir), "--log-format", "text"],
        stdout=subprocess.PIPE, stderr=open(log, "w"), text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    line = proc.stdout.readline()
    match = re.search(r"listening on \S+:(\d+)", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, f"127.0.0.1:{match.group(1)}"


def test_a_full_disk_is_a_plain_error_and_earlier_artifacts_stay_intact(tmp_path):
    """The server's files may not grow past 4 MiB (RLIMIT_FSIZE, as a full disk would refuse):
    a full fine-tune's 15 MiB checkpoint fails with RESOURCE_EXHAUSTED and a plain message; the
    LoRA saved before is intact, no partial file is left, and the server goes on."""
    artifacts = tmp_path / "artifacts"
    proc, target = _server_with_file_size_limit(artifacts, 4 * 2**20, tmp_path / "server.log")
    try:
        with adjointdpm.Client(target, timeout=120) as client:
            loss = adjointdpm.ServerLoss("classifier", {"label": 3})
            small = client.finetune_weights(loss, EXAMPLES, iterations=1, steps=3, lora_rank=2)
            _, before = client.download_artifact(small.artifact.id)
            code, details = _code(lambda: client.finetune_weights(
                loss, EXAMPLES, method="full", iterations=2, checkpoint_every=1, steps=3))
            assert code == "RESOURCE_EXHAUSTED", details
            assert "artifact storage is full (EFBIG)" in details and "Traceback" not in details
            _, after = client.download_artifact(small.artifact.id)
            assert after == before
            assert sorted(p.suffix for p in artifacts.iterdir()) == [".json", ".safetensors"]
            assert client.sample(labels=1, steps=3).x0.shape == (1, 1, 8, 8)
    finally:
        proc.kill()
        proc.wait(10)


def test_orphans_are_removed_at_start_but_never_a_live_write_of_another_replica(tmp_path):
    """At start a replica removes its own unfinished writes (an earlier life's) at once, and
    anyone's orphans (temporaries, data without its description, descriptions without data)
    only once they are older than the lease: a fresh one may be another replica's save between
    its two publishes, and killing it would lose that artifact."""
    import torch

    store = ArtifactStore(tmp_path, cluster=LocalCoordination("replica-a", lease_s=60))
    kept = store.save("lora", {"w": torch.ones(3)}, model="digits")
    names = {"data": f"lora-{'a' * 32}.safetensors", "sidecar": f"embedding-{'b' * 32}.json",
             "temporary": f"lora-{'c' * 32}.safetensors.replica-b.0123abcd.tmp",
             "legacy": f"lora-{'d' * 32}.safetensors.tmp",
             "mine": f"lora-{'e' * 32}.safetensors.replica-a.4567cdef.tmp"}
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    unrelated = tmp_path / "README.txt"
    unrelated.write_text("not ours")

    again = ArtifactStore(tmp_path, cluster=LocalCoordination("replica-a", lease_s=60))
    assert again.removed_orphans == [names["mine"]]  # another replica's may still be writing
    assert all((tmp_path / n).exists() for k, n in names.items() if k != "mine")

    old = time.time() - 120  # older than the lease: their writers are dead
    for key in ("data", "sidecar", "temporary", "legacy"):
        os.utime(tmp_path / names[key], (old, old))
    third = ArtifactStore(tmp_path, cluster=LocalCoordination("replica-c", lease_s=60))
    assert sorted(third.removed_orphans) == sorted(names[k] for k in ("data", "sidecar", "temporary", "legacy"))
    assert unrelated.exists() and third.info(kept.id).id == kept.id
    assert [i.id for i in third.list()] == [kept.id]


def _check(channel, timeout=2.0):
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status


def test_health_check_is_answered_when_every_call_slot_is_taken(tmp_path):
    """8 call slots, 2 watch slots: 8 silent bidi streams and 4 Watch streams later, Check still
    answers SERVING at once, a ninth call and a third Watch are refused, and so is nothing on the
    health port."""
    srv = build_server(ServerConfig(models=("digits",), port=0, artifact_dir=tmp_path / "a",
                                    workers=8, max_health_watches=2, health_port=0, limits=LIMITS))
    target = f"127.0.0.1:{srv.port}"
    release = threading.Event()
    calls = []
    try:
        with grpc.insecure_channel(target) as channel, \
                grpc.insecure_channel(f"127.0.0.1:{srv.health_port}") as health_channel:
            def silent():
                release.wait(60)
                return
                yield

            stub = pb_grpc.AdjointDPMServiceStub(channel)
            for _ in range(8):
                calls.append(stub.ComputeGradient(silent(), timeout=60))
            watches = [health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
                       for _ in range(4)]
            time.sleep(1.0)  # let every stream reach its handler
            start = time.time()
            assert _check(channel) == health_pb2.HealthCheckResponse.SERVING
            assert time.time() - start < 1.0
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Sample(pb.SampleRequest(generation=pb.Generation(steps=3)), timeout=10))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            refused = 0
            for w in watches:
                try:
                    next(iter(w))
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    refused += 1
            assert refused == 2
            health_watches = [health_pb2_grpc.HealthStub(health_channel).Watch(
                health_pb2.HealthCheckRequest(), timeout=60) for _ in range(5)]
            time.sleep(0.5)
            assert _check(health_channel) == health_pb2.HealthCheckResponse.SERVING
            for w in watches + health_watches:
                w.cancel()
    finally:
        release.set()
        for c in calls:
            c.cancel()
        srv.stop(0)


def test_two_tenants_one_hostile(tmp_path):
    """Tenant A: 64 idle streams, unanswered loss queries, a disk-filling fine-tune, NaN inputs.
    Tenant B samples throughout: every call succeeds at its usual speed, health stays SERVING,
    A stays within its quotas and sees nothing of B's (nor B of A's)."""
    srv = _server(tmp_path, tenant_max_jobs=4, tenant_storage_mib=5.0, max_active_jobs=16)
    target = f"127.0.0.1:{srv.port}"
    store = srv.runtime.artifacts
    loss = adjointdpm.ServerLoss("classifier", {"label": 3})
    hostile_outcomes: dict[str, list[str]] = {"idle": [], "fill": [], "nan": []}
    try:
        with adjointdpm.Client(target, token="token-a", timeout=120) as a, \
                adjointdpm.Client(target, token="token-b", timeout=120) as b, \
                grpc.insecure_channel(target) as channel:
            a_lora = a.finetune_weights(loss, EXAMPLES, iterations=1, steps=3, lora_rank=2).artifact.id
            b_lora = b.finetune_weights(loss, EXAMPLES, iterations=1, steps=3, lora_rank=2).artifact.id

            def b_sample(k):
                t0 = time.perf_counter()
                b.sample(labels=k % 10, seed=k, steps=10)
                return time.perf_counter() - t0

            for k in range(2):
                b_sample(k)  # warm-up
            before = [b_sample(k) for k in range(8)]

            stop, b_times, b_errors, health = threading.Event(), [], [], []

            def tenant_b():
                k = 0
                while not stop.is_set():
                    try:
                        b_times.append(b_sample(k))
                    except Exception as err:  # noqa: BLE001
                        b_errors.append(repr(err))
                    try:
                        health.append(_check(channel, timeout=5.0))
                    except grpc.RpcError as err:
                        health.append(err.code().name)
                    k += 1

            worker = threading.Thread(target=tenant_b)
            worker.start()
            # A, hostile: a disk-filling fine-tune and NaN inputs …
            fill = _code(lambda: a.finetune_weights(loss, EXAMPLES, method="full", iterations=20,
                                                    checkpoint_every=1, steps=3))
            hostile_outcomes["fill"].append(fill[0] if "tenant storage quota" in fill[1] else fill)
            hostile_outcomes["nan"].append(_code(lambda: a.sample(
                model="digits", x_T=np.full((1, 1, 8, 8), np.nan, np.float32), steps=3))[0])
            # … unanswered loss queries (they take two of A's job slots) …
            silent = [SilentGradient(channel, "token-a") for _ in range(2)]
            assert all(s.asked.wait(30) for s in silent)
            # … and 64 streams that never say anything
            release = threading.Event()

            def idle():
                release.wait(60)
                return
                yield

            idle_calls = [pb_grpc.AdjointDPMServiceStub(channel).ComputeGradient(
                idle(), metadata=(("authorization", "Bearer token-a"),), timeout=60) for _ in range(64)]
            time.sleep(3.0)  # B keeps sampling beside all of it
            stop.set()
            worker.join(120)
            release.set()
            for call in idle_calls:
                try:
                    for _ in call:
                        pass
                    hostile_outcomes["idle"].append("OK")
                except grpc.RpcError as err:
                    hostile_outcomes["idle"].append(err.code().name)
            for s in silent:
                s.close()
            assert not {x["id"] for m in b.list_models() for x in m["adapters"]} & {a_lora}
            assert not {x["id"] for m in a.list_models() for x in m["adapters"]} & {b_lora}
            after = [b_sample(k) for k in range(8)]  # A's hostility over: the baseline again
        # the baseline before and after, so that a neighbour's load on a shared machine shifts both
        baseline = statistics.median(before + after)
        print(f"two tenants: B {len(b_times)} Samples, {len(b_errors)} failed, p50 "
              f"{statistics.median(b_times) * 1e3:.0f} ms beside A vs {baseline * 1e3:.0f} ms baseline; "
              f"{len(health)} health checks {set(health)}; A's calls: "
              f"{ {k: dict(collections.Counter(v)) for k, v in hostile_outcomes.items()} }; "
              f"A's storage {store.usage('alice') / 2**20:.2f} MiB of 5")
        assert not b_errors and len(b_times) >= 5
        assert statistics.median(b_times) <= 1.5 * baseline + 0.05, (statistics.median(b_times), baseline)
        assert set(health) == {health_pb2.HealthCheckResponse.SERVING}
        assert hostile_outcomes["fill"] == ["RESOURCE_EXHAUSTED"]
        assert hostile_outcomes["nan"] == ["INVALID_ARGUMENT"]
        # A holds at most its 4 jobs: the 2 silent streams and 2 idle ones; the other 62 refused
        assert hostile_outcomes["idle"].count("RESOURCE_EXHAUSTED") == 62
        assert store.usage("alice") <= 5 * 2**20
    finally:
        srv.stop(0)
