"""Bad input gets the right status and a message to act on; the server stays healthy after."""

import threading
import time

import grpc
import numpy as np
import pytest

import adjointdpm
from adjointdpm.v1 import adjointdpm_pb2 as pb
from adjointdpm.v1 import adjointdpm_pb2_grpc as pb_grpc
from adjointdpm.v1 import tensor_pb2

MSE = adjointdpm.ServerLoss("mse", tensors={"target": np.zeros((1, 8, 8), np.float32)})


def _code(call, *args, **kwargs) -> tuple[str, str]:
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        call(*args, **kwargs)
    return err.value.code.name, err.value.details


def _healthy(client):
    assert client.sample(labels=1, seed=0, steps=2).x0.shape == (1, 1, 8, 8)


@pytest.mark.parametrize("kwargs, code, words", [
    (dict(model="nope"), "NOT_FOUND", "no model 'nope'"),
    (dict(x_T=np.zeros((2, 1, 8, 9), np.float32)), "INVALID_ARGUMENT", "x_T has shape"),
    (dict(x_T=np.full((1, 1, 8, 8), np.nan, np.float32)), "INVALID_ARGUMENT", "NaN"),
    (dict(batch=1000), "INVALID_ARGUMENT", "batch must lie"),
    (dict(steps=100_000), "INVALID_ARGUMENT", "steps must lie"),
    (dict(solver="rk45"), "INVALID_ARGUMENT", "unknown solver"),
    (dict(grid="cosine"), "INVALID_ARGUMENT", "unknown grid"),
    (dict(labels=[12]), "INVALID_ARGUMENT", "0–9"),
    (dict(labels=[1, 2, 3], batch=2), "INVALID_ARGUMENT", "one per sample"),
    (dict(prompt="a cat"), "INVALID_ARGUMENT", "single digit"),
    (dict(adapter="lora-" + "0" * 32), "NOT_FOUND", "no artifact"),
    (dict(adapter="../../etc/passwd"), "INVALID_ARGUMENT", "not an artifact id"),
    (dict(embedding="embedding-" + "f" * 32), "NOT_FOUND", "no artifact"),
    (dict(t_start=0.5), "INVALID_ARGUMENT", "needs the state"),
    (dict(guidance_scale=float("inf")), "INVALID_ARGUMENT", "finite"),
])
def test_sample_refusals(client, kwargs, code, words):
    got, details = _code(client.sample, **{"seed": 0, "steps": 2, **kwargs})
    assert got == code and words in details
    _healthy(client)


def test_a_short_error_message_comes_back_whole(client, rt):
    """Details are cut only past 1 KiB: a short message arrives exactly as the server said it."""
    _, details = _code(client.sample, model="nope", seed=0, steps=2)
    assert details == f"no model 'nope' on this server; it serves {', '.join(rt.models)}"


def test_a_plugin_on_the_old_scalar_contract_is_refused_plainly(client, monkeypatch):
    """A third-party plugin that still returns one number for the batch (the contract before
    per-sample losses, docs/design.md §4.3) gets INVALID_ARGUMENT naming the shapes."""
    from adjointdpm_server import losses
    from adjointdpm_server.losses import LossPlugin

    class BatchMean(LossPlugin):
        name, description = "batch_mean", "the old contract: one number for the batch"

        def __call__(self, x):
            return x.mean()

    found = {**losses.discover_losses(), "batch_mean": BatchMean}
    monkeypatch.setattr(losses, "discover_losses", lambda: found)
    got, details = _code(client.compute_gradient, adjointdpm.ServerLoss("batch_mean"), labels=[1, 2],
                         seed=0, steps=2)
    assert got == "INVALID_ARGUMENT"
    assert "returned shape (); a loss gives one value per sample (2,)" in details


def test_malformed_tensor_messages(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.AdjointDPMServiceStub(channel)
        bad = [tensor_pb2.Tensor(dtype="float32", shape=[1, 1, 8, 8], data=b"\0" * 10),
               tensor_pb2.Tensor(dtype="pickle", shape=[1], data=b"\x80\x04K\x01."),
               tensor_pb2.Tensor(dtype="float32", shape=[2**20, 2**20, 1, 1], data=b"")]
        for tensor in bad:
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Sample(pb.SampleRequest(generation=pb.Generation(start_latents=tensor)), timeout=30))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_gradient_refusals(client):
    assert _code(client.compute_gradient, adjointdpm.ServerLoss("nope"), seed=0, steps=2)[0] == "INVALID_ARGUMENT"
    code, details = _code(client.compute_gradient, adjointdpm.ServerLoss("classifier", {"label": "eight"}),
                          seed=0, steps=2)
    assert code == "INVALID_ARGUMENT" and "label" in details
    code, details = _code(client.compute_gradient, MSE, targets=["token"], prompt="1", seed=0, steps=2)
    assert code == "INVALID_ARGUMENT" and "text encoder" in details
    code, details = _code(client.compute_gradient, adjointdpm.ServerLoss("mse", tensors={"target": np.zeros((3, 3), np.float32)}),
                          seed=0, steps=2)
    assert code == "INVALID_ARGUMENT" and "target" in details
    code, _ = _code(client.compute_gradient, MSE, grad_mode="none", seed=0, steps=2)
    assert code == "INVALID_ARGUMENT"
    code, _ = _code(client.compute_gradient, adjointdpm.ServerLoss("classifier", {"label": 1}),
                    model="gaussian-mixture", seed=0, steps=2)
    assert code == "INVALID_ARGUMENT"
    _healthy(client)


@pytest.mark.parametrize("answer, words", [
    (lambda x: (float("nan"), np.zeros_like(x)), "non-finite loss"),
    (lambda x: (1.0, np.full_like(x, np.inf)), "NaN or Inf"),
    (lambda x: (1.0, np.zeros((3,), np.float32)), "shape"),
])
def test_bad_client_answers(client, answer, words):
    loss = adjointdpm.ClientLoss(answer, name="bad", autograd=False)
    code, details = _code(client.compute_gradient, loss, seed=0, steps=3)
    assert code == "INVALID_ARGUMENT" and words in details
    _healthy(client)


def test_client_loss_that_raises_cancels_only_its_call(client):
    def broken(x):
        raise RuntimeError("user bug")

    with pytest.raises(RuntimeError, match="user bug"):
        client.compute_gradient(adjointdpm.ClientLoss(broken, autograd=False), seed=0, steps=3)
    _healthy(client)


def test_cancel_mid_stream_stops_the_job(client, server):
    """A cancelled call stops within a step; a concurrent job on the other slot is not hurt."""
    call = client.optimize_latent(MSE, iterations=50, seed=0, steps=20, stream=True)
    other = {}
    thread = threading.Thread(target=lambda: other.setdefault(
        "r", client.compute_gradient(MSE, seed=1, steps=6)))
    thread.start()
    progress = 0
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        for event in call:
            progress += event.WhichOneof("kind") == "progress"
            if progress == 3:
                call.cancel()
    assert err.value.code.name == "CANCELLED"
    thread.join(60)
    assert other["r"].gradients["x_T"].shape == (1, 1, 8, 8)
    deadline = time.time() + 10
    while server.service.active_jobs and time.time() < deadline:
        time.sleep(0.05)
    assert server.service.active_jobs == 0  # the cancelled job's thread ended, not 50 iterations later
    _healthy(client)


def test_client_closing_without_answering(server):
    """A client that half-closes its stream instead of answering ends that job only."""
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.AdjointDPMServiceStub(channel)
        request = pb.GradientSpec(generation=pb.Generation(seed=0, steps=2),
                                     losses=[pb.LossTerm(client="mine")])
        events = stub.ComputeGradient(iter([pb.ComputeGradientRequest(spec=request)]), timeout=60)
        kinds = []
        with pytest.raises(grpc.RpcError) as err:
            for e in events:
                kinds.append(e.WhichOneof("kind"))
        assert "loss_query" in kinds  # it was asked, then the job ended for want of an answer
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "without answering" in err.value.details()


def test_unsolicited_loss_reply_ends_that_job_only(client, server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.AdjointDPMServiceStub(channel)
        request = pb.GradientSpec(generation=pb.Generation(seed=0, steps=50),
                                     losses=[pb.LossTerm(server=pb.ServerLoss(name="classifier"))])
        request.losses[0].server.params.update({"label": 1})
        flood = [pb.ComputeGradientRequest(spec=request)] + [
            pb.ComputeGradientRequest(loss_reply=pb.LossReply(term=0, value=1.0))] * 5
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ComputeGradient(iter(flood), timeout=60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "nobody asked for" in err.value.details()
    _healthy(client)


def test_bounds_on_lora_rank_and_guided_steps(client):
    code, details = _code(client.compute_gradient, MSE, targets=["weights"], weights={"lora_rank": 10**6},
                          seed=0, steps=2)
    assert code == "INVALID_ARGUMENT" and "lora_rank" in details
    code, _ = _code(client.finetune_weights, MSE, [{"seed": 0}], lora_rank=10**6, iterations=1, steps=2)
    assert code == "INVALID_ARGUMENT"
    code, details = _code(client.optimize_latent, MSE, guided={"grad_steps": 4_000_000_000}, seed=0, steps=2)
    assert code == "INVALID_ARGUMENT" and "grad_steps" in details


def test_adapter_of_another_model_is_refused_even_when_cached(client):
    tuned = client.finetune_weights(MSE, [{"seed": 0}], method="full", iterations=1, steps=2,
                                    model="gaussian-mixture")
    client.sample(model="gaussian-mixture", seed=0, steps=2, adapter=tuned.artifact.id)  # now cached
    code, details = _code(client.sample, seed=0, steps=2, adapter=tuned.artifact.id)  # digits
    assert code == "FAILED_PRECONDITION" and "gaussian-mixture" in details
    code, details = _code(client.compute_gradient, MSE, targets=["weights"], weights={"lora_rank": 2},
                          model="gaussian-mixture", adapter=tuned.artifact.id, seed=0, steps=2)
    assert code == "INVALID_ARGUMENT" and "adapter" in details


def test_abandoned_stream_is_cancelled_by_the_sdk(client, server):
    call = client.optimize_latent(MSE, iterations=50, seed=0, steps=20, stream=True)
    for event in call:
        if event.WhichOneof("kind") == "progress":
            break  # abandon: the SDK cancels the call
    deadline = time.time() + 10
    while not server.service.idle and time.time() < deadline:
        time.sleep(0.05)
    assert server.service.idle


def test_silent_stream_is_closed_after_the_first_message_timeout(server, monkeypatch):
    from adjointdpm_server.wire import streams as jobs

    monkeypatch.setattr(jobs, "FIRST_MESSAGE_S", 0.5)
    never = threading.Event()

    def silent():
        never.wait(30)
        return
        yield

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        start = time.time()
        with pytest.raises(grpc.RpcError) as err:
            list(pb_grpc.AdjointDPMServiceStub(channel).ComputeGradient(silent(), timeout=20))
        never.set()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and time.time() - start < 10


@pytest.mark.parametrize("rpc", ["ComputeGradient", "OptimizeLatent", "FinetuneWeights", "OptimizeEmbedding"])
def test_a_stream_that_opens_with_a_loss_reply_is_refused(server, client, rpc):
    """The first message of a bidi stream is the spec; a loss reply first is a protocol error,
    never a request read as all defaults."""
    first = getattr(pb, f"{rpc}Request")(loss_reply=pb.LossReply(term=0, value=1.0))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.RpcError) as err:
            list(getattr(pb_grpc.AdjointDPMServiceStub(channel), rpc)(iter([first]), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{rpc}: the first message must be the spec" in err.value.details()
    _healthy(client)
