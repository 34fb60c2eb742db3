"""Paths the suite never executed before: a loss reply for the wrong term or without a
gradient, OptimizeLatent's L2 ball, artifact expiry, and loading the tokens file."""

from __future__ import annotations

import json
import queue
import time

import grpc
import numpy as np
import pytest
import torch

import adjointdpm
from adjointdpm.tensors import encode_tensor
from adjointdpm.v1 import adjointdpm_pb2 as pb
from adjointdpm.v1 import adjointdpm_pb2_grpc as pb_grpc
from adjointdpm_server.storage.artifacts import ArtifactStore
from adjointdpm_server.wire.auth import Tenants, load_tokens


def _answer(server, reply):
    """A ComputeGradient whose client answers its loss query with ``reply(query)``."""
    outbox: queue.Queue = queue.Queue()
    request = pb.GradientSpec(generation=pb.Generation(labels=[1], seed=0, steps=2),
                                 losses=[pb.LossTerm(client="mine")])
    outbox.put(pb.ComputeGradientRequest(spec=request))

    def requests():
        while (msg := outbox.get()) is not None:
            yield msg

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = pb_grpc.AdjointDPMServiceStub(channel).ComputeGradient(requests(), timeout=60)
        try:
            for event in call:
                if event.WhichOneof("kind") == "loss_query":
                    outbox.put(pb.ComputeGradientRequest(loss_reply=reply(event.loss_query)))
            return "OK", ""
        except grpc.RpcError as err:
            return err.code().name, err.details()
        finally:
            outbox.put(None)


def test_a_reply_for_another_term_is_refused(server):
    code, details = _answer(server, lambda q: pb.LossReply(
        term=q.term + 1, value=1.0, grad=encode_tensor(np.zeros(tuple(q.x.shape), np.float32))))
    assert code == "INVALID_ARGUMENT" and "loss reply for term 1, but term 0 was asked" in details


def test_a_reply_without_a_gradient_is_refused(server):
    code, details = _answer(server, lambda q: pb.LossReply(term=q.term, value=1.0))
    assert code == "INVALID_ARGUMENT" and "carries no gradient" in details


def test_a_correct_reply_is_taken(server):
    code, _ = _answer(server, lambda q: pb.LossReply(
        term=q.term, value=1.0, grad=encode_tensor(np.ones(tuple(q.x.shape), np.float32))))
    assert code == "OK"


@pytest.mark.parametrize("values, expected", [
    ([1.0], "OK"),
    ([0.5], "summing to 0.5, not to its value 1"),
    ([0.5, 0.5], "2 per-sample values for a batch of 1"),
    ([float("nan")], "per-sample value"),
    ([1e300], "per-sample value"),
])
def test_per_sample_values_in_a_reply_are_checked(server, values, expected):
    """A client's per-sample values must be one per sample, finite, in range, and sum to its
    value (docs/design.md §4.3); the total is what the objective differentiates."""
    code, details = _answer(server, lambda q: pb.LossReply(
        term=q.term, value=1.0, grad=encode_tensor(np.ones(tuple(q.x.shape), np.float32)),
        values=values))
    if expected == "OK":
        assert code == "OK"
    else:
        assert code == "INVALID_ARGUMENT" and expected in details


def test_optimize_latent_keeps_x_T_in_its_l2_ball(client):
    loss = adjointdpm.ServerLoss("classifier", {"label": 8})
    start = client.sample(batch=2, seed=4, steps=3, images=False).x_T
    r = client.optimize_latent(loss, constraint="l2", epsilon=0.5, iterations=3, lr=0.5, batch=2,
                               seed=4, steps=3)
    moved = np.linalg.norm((r.x_T - start).reshape(2, -1), axis=1)
    assert (moved <= 0.5 + 1e-5).all()  # projected back onto the ball
    assert (moved > 0.45).all()  # lr 0.5 pushes past the ball: each sample ends on its sphere


def test_artifacts_older_than_the_retention_expire(tmp_path):
    store = ArtifactStore(tmp_path)
    old = store.save("lora", {"w": torch.ones(2)}, model="digits")
    new = store.save("lora", {"w": torch.ones(2)}, model="digits")
    sidecar = tmp_path / f"{old.id}.json"
    data = json.loads(sidecar.read_text())
    data["created"] = time.time() - 3 * 3600
    sidecar.write_text(json.dumps(data))
    assert store.expire(0) == []  # 0 = keep forever
    assert store.expire(2 * 3600) == [old.id]
    assert not (tmp_path / f"{old.id}.safetensors").exists() and not sidecar.exists()
    assert [i.id for i in store.list()] == [new.id]


def test_the_tokens_file_and_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "tokens"
    path.write_text("# team tokens\nalice:a-secret\n\n  bare-token  \nalice:a-secret\n")
    monkeypatch.setenv("ADJOINTDPM_TOKENS", "bob:b-secret, ,extra")
    entries = load_tokens(path)
    assert entries == ("alice:a-secret", "bare-token", "bob:b-secret", "extra")  # deduplicated
    tenants = Tenants(entries)
    assert [tenants.tenant_of(t) for t in ("a-secret", "bare-token", "b-secret", "extra")] == \
        ["alice", "default", "bob", "default"]
    with pytest.raises(ValueError):
        Tenants(())
