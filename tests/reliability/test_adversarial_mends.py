"""Smaller mends found by an adversarial run (issue 25, item 9), each against a real loopback
server: NaN/Inf inside a server loss's ``params``; concurrent fine-tunes that each passed the
storage check at start; a quota message that promised a deletion nobody can make; an empty
stream message taken for "a second request"."""

from __future__ import annotations

import math
import queue
import re
import threading
import time

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2

import adjointdpm
from adjointdpm.v1 import adjointdpm_pb2 as pb
from adjointdpm.v1 import adjointdpm_pb2_grpc as pb_grpc
from adjointdpm_server.config import Limits, ServerConfig
from adjointdpm_server.wire import build_server

LIMITS = Limits(max_batch=16, max_steps=100, max_iterations=20, client_loss_timeout_s=30)
EXAMPLES = [{"seed": k, "label": k} for k in range(2)]


@pytest.fixture
def server(tmp_path):
    srv = build_server(ServerConfig(models=("digits",), port=0, artifact_dir=tmp_path / "artifacts",
                                    limits=LIMITS))
    try:
        yield srv
    finally:
        srv.stop(0)


def _code(fn) -> tuple[str, str]:
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        fn()
    return err.value.code.name, err.value.details


def _rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        for _ in call:
            pass
    return err.value


# -- 1. NaN / Inf inside a server loss's params Struct ---------------------------------------------
def _params(where: str, bad: float) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.fields["label"].number_value = 3
    if where == "top":
        s.fields["label"].number_value = bad
    elif where == "list":
        s.fields["scales"].list_value.values.add().number_value = 1.0
        s.fields["scales"].list_value.values.add().number_value = bad
    else:  # nested struct inside a list
        inner = s.fields["deep"].list_value.values.add().struct_value
        inner.fields["x"].number_value = bad
    return s


@pytest.mark.parametrize("where, field", [("top", "losses[0].params.label"),
                                          ("list", "losses[0].params.scales[1]"),
                                          ("nested", "losses[0].params.deep[0].x")])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_in_server_loss_params_is_invalid_argument_naming_the_field(server, where, field, bad):
    term = pb.LossTerm(server=pb.ServerLoss(name="classifier", params=_params(where, bad)))
    request = pb.GradientSpec(generation=pb.Generation(labels=[1], seed=0, steps=3), losses=[term])
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.AdjointDPMServiceStub(channel)
        err = _rpc_error(stub.ComputeGradient(iter([pb.ComputeGradientRequest(spec=request)]), timeout=60))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert field in err.details() and "finite" in err.details()
        assert "Traceback" not in err.details() and "internal" not in err.details().lower()
        # the same through the other RPCs that take losses
        opt = pb.OptimizeLatentSpec(generation=pb.Generation(labels=[1], seed=0, steps=3),
                                       losses=[term], optimizer=pb.Optimizer(iterations=1))
        err = _rpc_error(stub.OptimizeLatent(iter([pb.OptimizeLatentRequest(spec=opt)]), timeout=60))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.details()
        # and the server goes on
        params = struct_pb2.Struct()
        params.fields["label"].number_value = 3
        ok = pb.GradientSpec(generation=pb.Generation(labels=[1], seed=0, steps=3),
                                losses=[pb.LossTerm(server=pb.ServerLoss(name="classifier", params=params))])
        events = list(stub.ComputeGradient(iter([pb.ComputeGradientRequest(spec=ok)]), timeout=60))
        assert events[-1].WhichOneof("kind") == "result"


# -- 2 and 3. fine-tunes reserve their checkpoints' bytes at admission ----------------------------
def test_concurrent_finetunes_reserve_their_checkpoints_at_admission(tmp_path):
    """A LoRA rank-2 run with keep_checkpoints=2 reserves about 1 MiB (3 checkpoints of weights and
    two Adam moments, then the adapter): a 1.5 MiB quota fits one run, not two. The first run is
    held at its client loss (reserved, nothing written yet); the second is refused before any
    work; the first then completes; after it a new run is admitted."""
    srv = build_server(ServerConfig(models=("digits",), port=0, artifact_dir=tmp_path / "artifacts",
                                    limits=LIMITS, tokens=("alice:token-a",), tenant_storage_mib=1.5))
    target = f"127.0.0.1:{srv.port}"
    store = srv.runtime.artifacts
    asked, go = threading.Event(), threading.Event()
    first: dict = {}

    def held_loss(x):
        asked.set()
        assert go.wait(60)
        return 0.0, np.zeros_like(x)

    run = dict(iterations=3, checkpoint_every=1, steps=3, lora_rank=2, keep_checkpoints=2)

    def first_run():
        try:
            with adjointdpm.Client(target, token="token-a", timeout=120) as a:
                loss = adjointdpm.ClientLoss(held_loss, "held", autograd=False)
                first["result"] = a.finetune_weights(loss, EXAMPLES, **run)
        except Exception as err:  # noqa: BLE001 — reported by the assertion below
            first["error"] = err

    thread = threading.Thread(target=first_run, daemon=True)
    thread.start()
    try:
        assert asked.wait(60), first
        assert store.list(tenant="alice") == []  # reserved, nothing written yet
        with adjointdpm.Client(target, token="token-a", timeout=120) as a:
            loss = adjointdpm.ServerLoss("classifier", {"label": 3})
            calls = sum(srv.runtime.engine.stats.calls.values())
            code, details = _code(lambda: a.finetune_weights(loss, EXAMPLES, **run))
            assert code == "RESOURCE_EXHAUSTED", details
            assert re.search(r"tenant storage quota: [\d.]+ MiB used of 1.5 MiB", details), details
            assert re.search(r"[\d.]+ MiB (of it )?reserved", details), details
            assert sum(srv.runtime.engine.stats.calls.values()) == calls  # refused before any work
            # 3: the message says what helps: the deletion the caller can make (DeleteArtifact),
            # expiry, fewer checkpoints, the operator
            assert "DeleteArtifact" in details, details
            assert "keep_checkpoints" in details and "operator" in details and "expire" in details
            go.set()
            thread.join(120)
            assert "error" not in first, first.get("error")
            tuned = first["result"]
            kinds = sorted(i.kind for i in store.list(tenant="alice"))
            assert kinds == ["checkpoint", "checkpoint", "lora"]
            assert tuned.artifact.id in {i.id for i in store.list(tenant="alice")}
            assert store.usage("alice") <= 1.5 * 2**20
            # the reservation went with the run: the held bytes are now only what it wrote, and
            # a run that fits beside them is admitted (keep_checkpoints=1 needs less)
            again = a.finetune_weights(loss, EXAMPLES, **{**run, "keep_checkpoints": 1})
            assert again.artifact.id
    finally:
        go.set()
        thread.join(60)
        srv.stop(0)


def test_a_run_that_fails_after_admission_releases_its_reservation(tmp_path):
    """The reservation goes with the run however it ends: a run whose client loss raises (the
    SDK ends the stream after admission) leaves nothing reserved, and a full run fits again."""
    srv = build_server(ServerConfig(models=("digits",), port=0, artifact_dir=tmp_path / "artifacts",
                                    limits=LIMITS, tenant_storage_mib=1.5))
    target = f"127.0.0.1:{srv.port}"
    store = srv.runtime.artifacts
    run = dict(iterations=3, checkpoint_every=1, steps=3, lora_rank=2, keep_checkpoints=2)
    try:
        with adjointdpm.Client(target, timeout=120) as c:
            def failing(x):
                raise RuntimeError("the client's loss fails")

            with pytest.raises(Exception):
                c.finetune_weights(adjointdpm.ClientLoss(failing, "failing", autograd=False), EXAMPLES, **run)
            deadline = time.time() + 20
            while srv.service.active_jobs and time.time() < deadline:
                time.sleep(0.05)
            assert store.reserved() == 0
            # one full run fits: nothing is left reserved by the failed one
            tuned = c.finetune_weights(adjointdpm.ServerLoss("classifier", {"label": 3}), EXAMPLES, **run)
            assert tuned.artifact.id and store.reserved() == 0
    finally:
        srv.stop(0)


# -- 4. an empty stream message ---------------------------------------------------------------------
def _client_loss_request(rpc: str):
    gen = pb.Generation(labels=[1], seed=0, steps=3)
    term = pb.LossTerm(client="held", weight=1.0)
    if rpc == "ComputeGradient":
        return pb.ComputeGradientRequest, pb.GradientSpec(generation=gen, losses=[term])
    if rpc == "OptimizeLatent":
        return pb.OptimizeLatentRequest, pb.OptimizeLatentSpec(
            generation=gen, losses=[term], optimizer=pb.Optimizer(iterations=2))
    if rpc == "FinetuneWeights":
        return pb.FinetuneWeightsRequest, pb.FinetuneWeightsSpec(
            generation=pb.Generation(steps=3), losses=[term], optimizer=pb.Optimizer(iterations=2),
            examples=[pb.FinetuneExample(seed=0, label=1)], lora_rank=2)
    return pb.OptimizeEmbeddingRequest, pb.OptimizeEmbeddingSpec(
        generation=gen, losses=[term], optimizer=pb.Optimizer(iterations=2))


RPCS = ["ComputeGradient", "OptimizeLatent", "FinetuneWeights", "OptimizeEmbedding"]


@pytest.mark.parametrize("rpc", RPCS)
def test_an_empty_first_message_is_invalid_argument(server, rpc):
    message, _ = _client_loss_request(rpc)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = getattr(pb_grpc.AdjointDPMServiceStub(channel), rpc)(iter([message()]), timeout=60)
        err = _rpc_error(call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "neither a spec nor a loss reply" in err.details()
    assert "second request" not in err.details()


@pytest.mark.parametrize("rpc", RPCS)
def test_an_empty_message_after_the_request_is_invalid_argument(server, rpc):
    message, request = _client_loss_request(rpc)
    outbox: queue.Queue = queue.Queue()
    outbox.put(message(spec=request))

    def requests():
        while True:
            item = outbox.get()
            if item is None:
                return
            yield item

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = getattr(pb_grpc.AdjointDPMServiceStub(channel), rpc)(requests(), timeout=60)
        try:
            with pytest.raises(grpc.RpcError) as err:
                for event in call:
                    if event.WhichOneof("kind") == "loss_query":
                        outbox.put(message())  # neither a spec nor a loss reply
        finally:
            outbox.put(None)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "neither a spec nor a loss reply" in err.value.details()
    assert "second request" not in err.value.details()
