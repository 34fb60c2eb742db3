"""Integrity end to end, on real servers over loopback: numbers the client sends are finite and
within the working dtype's safe range (else INVALID_ARGUMENT naming the field), client loss
replies are checked in the working dtype, loss weights and parameters are bounded, error details
stay small, undecodable requests and malformed artifact ids are INVALID_ARGUMENT, the status
counted is the one the client saw (CANCELLED), and replies too large for one message are refused
before the work or routed to an artifact."""

from __future__ import annotations

import logging
import math
import queue
import re
import time
import urllib.request

import grpc
import numpy as np
import pytest

import adjointdpm
from adjointdpm.tensors import decode_tensor, encode_tensor
from adjointdpm.v1 import adjointdpm_pb2 as pb
from adjointdpm.v1 import adjointdpm_pb2_grpc as pb_grpc
from adjointdpm_server.config import Limits, ServerConfig
from adjointdpm_server.wire import build_server

INVALID = grpc.StatusCode.INVALID_ARGUMENT
MIX = "gaussian-mixture"  # cond of shape (B, 1, 8, 8) added to the mixture's means
TARGET = np.full((1, 8, 8), 0.5, np.float32)


# ---- servers and helpers ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = build_server(ServerConfig(
        models=("digits", MIX), port=0, artifact_dir=tmp_path_factory.mktemp("artifacts"),
        metrics_port=0, max_active_jobs=8,
        limits=Limits(max_batch=16, max_steps=200, max_iterations=20, client_loss_timeout_s=20)))
    try:
        yield srv
    finally:
        srv.stop(0)


@pytest.fixture(scope="module")
def client(server):
    with adjointdpm.Client(f"127.0.0.1:{server.port}", timeout=60) as c:
        yield c


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.AdjointDPMServiceStub(channel)


def _engine_calls(srv) -> int:
    return sum(srv.runtime.engine.stats.calls.values())


def _refused(call, *args, **kwargs) -> adjointdpm.AdjointDPMError:
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        call(*args, **kwargs)
    return err.value


def _names(field: str, details: str) -> bool:
    return re.search(r"(?<![\w.])" + re.escape(field) + r"(?![\w])", details) is not None


def _metrics(port: int) -> dict[tuple[str, str], float]:
    """adjointdpm_requests_total by (rpc, code)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    counts = {}
    for line in text.splitlines():
        m = re.fullmatch(r'adjointdpm_requests_total\{(.*)\} (\S+)', line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            counts[labels["rpc"], labels["code"]] = float(m.group(2))
    return counts


def _wait_idle(srv, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not srv.service.idle:
        assert time.monotonic() < deadline, "jobs still running"
        time.sleep(0.05)


def _healthy(client):
    assert client.sample(model=MIX, seed=0, steps=3).x0.shape == (1, 1, 8, 8)
    assert client.sample(labels=1, seed=0, steps=3).x0.shape == (1, 1, 8, 8)


# ---- 1. client tensors: finite and within the safe range of float32 -----------------------------

BAD = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "1e30": 1e30, "just over the safe range": 2e19}


@pytest.mark.parametrize("fill", BAD.values(), ids=BAD.keys())
def test_cond_out_of_range_is_refused_naming_cond(server, client, fill):
    before = _engine_calls(server)
    err = _refused(client.sample, model=MIX, cond=np.full((2, 1, 8, 8), fill, np.float32), batch=2,
                   steps=3, seed=0)
    assert err.code == INVALID and _names("cond", err.details), err.details
    assert "NaN or Inf" in err.details or "magnitude" in err.details, err.details
    assert _engine_calls(server) == before  # refused before any network call


def test_float64_cond_that_overflows_float32_is_refused(server, client):
    """1e300 is finite in float64 but Inf in the working dtype: refused, not propagated."""
    err = _refused(client.sample, model=MIX, cond=np.full((1, 1, 8, 8), 1e300, np.float64), steps=3)
    assert err.code == INVALID and _names("cond", err.details), err.details
    assert "NaN or Inf" in err.details or "magnitude" in err.details, err.details


@pytest.mark.parametrize("fill", [1e30, -1e30, 2e19, np.inf])
def test_x_T_out_of_range_is_refused_naming_x_T(server, client, fill):
    before = _engine_calls(server)
    err = _refused(client.sample, model=MIX, x_T=np.full((1, 1, 8, 8), fill, np.float32), steps=3)
    assert err.code == INVALID and _names("x_T", err.details), err.details
    assert "NaN or Inf" in err.details or "magnitude" in err.details, err.details
    assert _engine_calls(server) == before


def test_in_range_tensors_are_accepted_and_the_server_stays_healthy(client):
    big = client.sample(model=MIX, cond=np.full((2, 1, 8, 8), 1e3, np.float32), batch=2, steps=3,
                        seed=0)
    assert big.x0.shape == (2, 1, 8, 8) and np.isfinite(big.x0).all()
    _healthy(client)


def test_other_tensor_fields_are_checked_too(client):
    """Loss tensors and fine-tune examples go through the same check, named by field."""
    mse = adjointdpm.ServerLoss("mse", tensors={"target": np.full((1, 8, 8), 1e30, np.float32)})
    err = _refused(client.compute_gradient, mse, seed=0, steps=3)
    assert err.code == INVALID and "losses[0].tensors['target']" in err.details, err.details
    ok = adjointdpm.ServerLoss("mse", tensors={"target": TARGET})
    err = _refused(client.finetune_weights, ok,
                   [{"x_T": np.full((1, 1, 8, 8), np.nan, np.float32), "label": 1}],
                   iterations=1, steps=2)
    assert err.code == INVALID and "examples[0].start_latents" in err.details, err.details


# ---- 2. client loss replies: checked in the working dtype ---------------------------------------

def _huge_grad(x):
    return float(np.mean(x)), np.full(x.shape, 1e300, np.float64)  # finite in float64


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the SDK's cast
def test_client_loss_gradient_of_1e300_is_refused_by_compute_gradient(client):
    err = _refused(client.compute_gradient, adjointdpm.ClientLoss(_huge_grad, autograd=False),
                   seed=0, steps=3)
    assert err.code == INVALID and "client loss '_huge_grad'" in err.details, err.details
    assert "gradient" in err.details, err.details
    _healthy(client)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the SDK's cast
def test_optimize_latent_never_returns_a_non_finite_x_T_with_ok(client):
    err = _refused(client.optimize_latent, adjointdpm.ClientLoss(_huge_grad, autograd=False),
                   iterations=3, seed=0, steps=3)
    assert err.code == INVALID, err.details
    # gradients inside the safe range but large, with a large SGD step: whatever happens, an OK
    # result is finite
    def large(x):
        return float(np.mean(x)), np.full(x.shape, 1e18, np.float32)

    try:
        result = client.optimize_latent(adjointdpm.ClientLoss(large, autograd=False, domain="latent"),
                                        optimizer="sgd", lr=1e6, iterations=3, seed=0, steps=3)
    except adjointdpm.AdjointDPMError as e:
        assert e.code == INVALID, e
    else:
        assert np.isfinite(result.x_T).all() and np.isfinite(result.x0).all()
        assert all(math.isfinite(v) for v in [result.loss, *result.history])


def test_loss_queries_never_carry_non_finite_numbers(client):
    seen = []

    def mean(x):
        seen.append(bool(np.isfinite(x).all()))
        return float(np.mean(np.nan_to_num(x))), np.full(x.shape, 1e10, np.float32)

    try:
        client.optimize_latent(adjointdpm.ClientLoss(mean, autograd=False, domain="latent"),
                               optimizer="sgd", lr=1e6, iterations=3, seed=0, steps=3)
    except adjointdpm.AdjointDPMError as err:
        assert err.code == INVALID, err
    assert seen and all(seen), seen


def _raw_bidi(stub, rpc: str, request, reply_grad, value=1.0):
    """Open ``rpc``, answer every loss query with ``reply_grad(x)`` (any dtype: sent as given);
    the status code and details the stream ended with, and the final event."""
    wrapper = {"ComputeGradient": pb.ComputeGradientRequest, "OptimizeLatent": pb.OptimizeLatentRequest}[rpc]
    outbox: queue.Queue = queue.Queue()
    outbox.put(wrapper(spec=request))

    def requests():
        while (msg := outbox.get()) is not None:
            yield msg

    call = getattr(stub, rpc)(requests(), timeout=60)
    last = None
    try:
        for event in call:
            last = event
            if event.WhichOneof("kind") == "loss_query":
                q = event.loss_query
                grad = reply_grad(decode_tensor(q.x))
                outbox.put(wrapper(loss_reply=pb.LossReply(term=q.term, value=value,
                                                            grad=encode_tensor(grad))))
        return grpc.StatusCode.OK, "", last
    except grpc.RpcError as err:
        return err.code(), err.details(), last
    finally:
        outbox.put(None)
        call.cancel()


@pytest.mark.parametrize("huge", [1e100, 1e300])
@pytest.mark.parametrize("rpc", ["ComputeGradient", "OptimizeLatent"])
def test_float64_gradient_that_overflows_float32_is_refused_on_the_wire(stub, rpc, huge):
    """Sent as float64 (the SDK would cast it to float32 itself): the server's check must convert
    to its working dtype, where 1e300 is Inf."""
    gen = pb.Generation(seed=0, steps=3)
    terms = [pb.LossTerm(client="huge")]
    request = (pb.GradientSpec(generation=gen, losses=terms) if rpc == "ComputeGradient" else
               pb.OptimizeLatentSpec(generation=gen, losses=terms,
                                        optimizer=pb.Optimizer(iterations=2)))
    code, details, _ = _raw_bidi(stub, rpc, request, lambda x: np.full(x.shape, huge, np.float64))
    # refused as the client's reply (not later, as a non-finite gradient of the server's own)
    assert code == INVALID and "gradient client loss 'huge' returned" in details, (code, details)
    # and a loss value finite in float64 but out of float32's safe range
    code, details, _ = _raw_bidi(stub, rpc, request, lambda x: np.zeros(x.shape, np.float64),
                                 value=huge)
    assert code == INVALID and "loss value client loss 'huge' returned" in details, (code, details)
    # control: the same exchange with sane numbers succeeds
    code, details, last = _raw_bidi(stub, rpc, request, lambda x: np.full(x.shape, 1e-3, np.float64))
    assert code == grpc.StatusCode.OK, details
    assert last.WhichOneof("kind") == "result"


# ---- 3. loss weights and numeric parameters are bounded -----------------------------------------

@pytest.mark.parametrize("weight", [1e308, -1e308, 2e6])
def test_huge_loss_weight_is_refused_naming_the_weight(server, client, weight):
    before = _engine_calls(server)
    mse = adjointdpm.ServerLoss("mse", tensors={"target": TARGET}, weight=weight)
    err = _refused(client.compute_gradient, mse, seed=0, steps=3)
    assert err.code == INVALID and "losses[0].weight" in err.details, err.details
    assert _engine_calls(server) == before


def test_weight_at_the_bound_is_accepted(client):
    mse = adjointdpm.ServerLoss("mse", tensors={"target": TARGET}, weight=1e6)
    result = client.compute_gradient(mse, seed=0, steps=3)
    assert math.isfinite(result.loss) and np.isfinite(result.gradients["x_T"]).all()


@pytest.mark.parametrize("loss, field", [
    # the plugin itself would accept any content_weight ≥ 0: only the service's bound refuses it
    (adjointdpm.ServerLoss("gram_style", params={"content_weight": 1e300},
                           tensors={"style": TARGET, "content": np.zeros((1, 1, 8, 8), np.float32)}),
     "losses[0].params.content_weight"),
    (adjointdpm.ServerLoss("classifier", params={"label": 1e300}), "losses[0].params.label"),
    (adjointdpm.ServerLoss("classifier", params={"label": [1, 2e20]}), "losses[0].params.label[1]"),
], ids=["gram_style.content_weight", "classifier.label", "classifier.label[1]"])
def test_huge_numeric_loss_param_is_refused(server, client, loss, field):
    before = _engine_calls(server)
    err = _refused(client.compute_gradient, loss, seed=0, steps=3)
    assert err.code == INVALID, err
    assert f"{field} must be finite and at most" in err.details, err.details
    assert _engine_calls(server) == before


def test_gram_style_content_weight_in_range_is_accepted(client):
    loss = adjointdpm.ServerLoss("gram_style", params={"content_weight": 1e3},
                                 tensors={"style": TARGET, "content": np.zeros((1, 1, 8, 8), np.float32)})
    assert math.isfinite(client.compute_gradient(loss, seed=0, steps=3).loss)


# ---- 4. error details stay small ------------------------------------------------------------------

FIVE_MB = "x" * 5_000_000


@pytest.mark.parametrize("call", [
    lambda c: c.compute_gradient(adjointdpm.ServerLoss("mse", params={"junk": FIVE_MB},
                                                       tensors={"target": TARGET}), seed=0, steps=3),
    lambda c: c.compute_gradient(adjointdpm.ServerLoss("mse", params={FIVE_MB: 1},
                                                       tensors={"target": TARGET}), seed=0, steps=3),
    lambda c: c.compute_gradient(adjointdpm.ServerLoss("classifier", params={"label": FIVE_MB}),
                                 seed=0, steps=3),
    lambda c: c.sample(model=FIVE_MB, steps=3),
    lambda c: c.sample(solver=FIVE_MB, steps=3),
], ids=["mse-junk-value", "mse-junk-key", "classifier-label", "model-name", "solver"])
def test_a_5mb_string_gets_its_real_error_with_small_details(client, call):
    err = _refused(call, client)
    assert err.code in (INVALID, grpc.StatusCode.NOT_FOUND), err
    assert len(err.details.encode()) <= 1024, len(err.details.encode())
    assert "metadata" not in err.details.lower()
    _healthy(client)


# ---- 5. undecodable request bytes ---------------------------------------------------------------

GARBAGE = [b"\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x52\x05abc"]


def _raw(channel, rpc: str, kind: str):
    method = f"/adjointdpm.v1.AdjointDPMService/{rpc}"
    make = getattr(channel, kind)
    out = pb.ListModelsResponse if rpc == "ListModels" else (
        pb.GetArtifactResponse if rpc == "GetArtifact" else getattr(pb, f"{rpc}Response"))
    return make(method, request_serializer=lambda b: b, response_deserializer=out.FromString)


def _delta(before, after, rpc, code):
    return after.get((rpc, code), 0) - before.get((rpc, code), 0)


def test_undecodable_unary_requests_are_invalid_argument(server, client):
    before = _metrics(server.metrics_port)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        sample = _raw(channel, "Sample", "unary_stream")
        artifact = _raw(channel, "GetArtifact", "unary_stream")
        models = _raw(channel, "ListModels", "unary_unary")
        for data in GARBAGE:
            for call in (sample, artifact):
                with pytest.raises(grpc.RpcError) as err:
                    list(call(data, timeout=30))
                assert err.value.code() == INVALID, (data, err.value.details())
        with pytest.raises(grpc.RpcError) as err:
            models(GARBAGE[0], timeout=30)
        assert err.value.code() == INVALID, err.value.details()
    after = _metrics(server.metrics_port)
    assert _delta(before, after, "Sample", "INVALID_ARGUMENT") == len(GARBAGE)
    assert _delta(before, after, "GetArtifact", "INVALID_ARGUMENT") == len(GARBAGE)
    assert _delta(before, after, "ListModels", "INVALID_ARGUMENT") == 1
    for rpc in ("Sample", "GetArtifact", "ListModels"):
        for code in ("INTERNAL", "UNKNOWN", "OK"):
            assert _delta(before, after, rpc, code) == 0, (rpc, code)
    _healthy(client)


BIDI = ["ComputeGradient", "OptimizeLatent", "FinetuneWeights", "OptimizeEmbedding"]


@pytest.mark.parametrize("rpc", BIDI)
def test_undecodable_first_message_of_a_bidi_stream_is_invalid_argument(server, rpc):
    before = _metrics(server.metrics_port)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = _raw(channel, rpc, "stream_stream")
        with pytest.raises(grpc.RpcError) as err:
            list(call(iter([GARBAGE[0]]), timeout=30))
    after = _metrics(server.metrics_port)
    assert err.value.code() == INVALID, err.value.details()
    assert _delta(before, after, rpc, "INVALID_ARGUMENT") == 1
    assert _delta(before, after, rpc, "INTERNAL") == 0


@pytest.mark.parametrize("rpc", ["ComputeGradient", "OptimizeLatent"])
def test_undecodable_loss_reply_is_invalid_argument(server, rpc):
    wrapper = {"ComputeGradient": pb.ComputeGradientRequest, "OptimizeLatent": pb.OptimizeLatentRequest}[rpc]
    gen, terms = pb.Generation(seed=0, steps=3), [pb.LossTerm(client="c")]
    request = (pb.GradientSpec(generation=gen, losses=terms) if rpc == "ComputeGradient" else
               pb.OptimizeLatentSpec(generation=gen, losses=terms,
                                        optimizer=pb.Optimizer(iterations=2)))
    outbox: queue.Queue = queue.Queue()
    outbox.put(wrapper(spec=request).SerializeToString())

    def requests():
        while (msg := outbox.get()) is not None:
            yield msg

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = _raw(channel, rpc, "stream_stream")(requests(), timeout=30)
        asked = 0
        try:
            with pytest.raises(grpc.RpcError) as err:
                for event in call:
                    if event.WhichOneof("kind") == "loss_query":
                        asked += 1
                        outbox.put(GARBAGE[0])
        finally:
            outbox.put(None)
    assert asked == 1
    assert err.value.code() == INVALID, (err.value.code(), err.value.details())


# ---- 6. artifact ids match whole ------------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["\n", "\r\n", " ", "\x00", "0"])
def test_artifact_id_with_trailing_junk_is_invalid_argument(server, client, suffix):
    good = "lora-" + "0123456789abcdef" * 2
    assert _refused(client.download_artifact, good).code == grpc.StatusCode.NOT_FOUND
    err = _refused(client.download_artifact, good + suffix)
    assert err.code == INVALID, err


def test_existing_artifact_id_with_a_newline_is_invalid_argument(client):
    result = client.compute_gradient(adjointdpm.ServerLoss("mse", tensors={"target": TARGET}),
                                     targets=["weights"], model=MIX, seed=0, steps=3,
                                     weights={"parameters": ["means"]})
    real = result.weights_artifact.id
    info, data = client.download_artifact(real)
    assert info.id == real and len(data) == info.size
    assert _refused(client.download_artifact, real + "\n").code == INVALID


# ---- 7. statuses that tell the truth ----------------------------------------------------------------

def test_cancelled_streams_are_counted_cancelled(server, stub, caplog):
    caplog.set_level(logging.INFO, logger="adjointdpm.requests")
    _wait_idle(server)
    before = _metrics(server.metrics_port)
    for k in range(5):
        events = stub.Sample(pb.SampleRequest(generation=pb.Generation(seed=k, steps=200, batch=2)),
                             timeout=60)
        for event in events:
            if event.WhichOneof("kind") == "progress":
                break
        else:
            pytest.fail("the stream ended before its first progress event")
        events.cancel()
    deadline = time.monotonic() + 30

    def delta(code):
        return _metrics(server.metrics_port).get(("Sample", code), 0) - before.get(("Sample", code), 0)

    while delta("CANCELLED") < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    _wait_idle(server)
    assert delta("CANCELLED") == 5
    assert delta("OK") == 0
    assert sum(after - before.get(key, 0) for key, after in _metrics(server.metrics_port).items()
               if key[0] == "Sample") == 5  # nothing else counted for them
    logged = [r.getMessage() for r in caplog.records if r.name == "adjointdpm.requests"
              and r.getMessage().startswith("Sample ")]
    assert sum(m.startswith("Sample CANCELLED") for m in logged) == 5, logged
    assert not any(m.startswith("Sample OK") for m in logged), logged


# ---- 8. replies that cannot fit in one message ----------------------------------------------------

@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """A 2 MiB message limit; batches up to 4096 so that a Sample reply can outgrow it."""
    srv = build_server(ServerConfig(
        models=("digits", MIX), port=0, artifact_dir=tmp_path_factory.mktemp("small"),
        limits=Limits(max_message_bytes=2 << 20, max_batch=4096, max_steps=200)))
    try:
        yield srv
    finally:
        srv.stop(0)


@pytest.fixture
def small_client(small_server):
    with adjointdpm.Client(f"127.0.0.1:{small_server.port}", timeout=60) as c:
        yield c


@pytest.mark.parametrize("model", ["digits", MIX])
def test_oversized_sample_reply_is_refused_before_the_work(small_server, small_client, model):
    before = _engine_calls(small_server)
    start = time.monotonic()
    # 4096 samples: x_0, x_T and float pixels alone are 4096 × 3 × 256 B ≈ 3 MiB > 2 MiB
    err = _refused(small_client.sample, model=model, batch=4096, pixels=True, steps=100, seed=0)
    elapsed = time.monotonic() - start
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    assert "message limit" in err.details, err.details
    assert elapsed < 5, f"refused only after {elapsed:.1f} s"
    assert _engine_calls(small_server) == before  # not one network call ran for it
    # a reply that fits is served
    assert small_client.sample(model=model, batch=4, pixels=True, steps=3, seed=0).x0.shape == (4, 1, 8, 8)


def test_weight_gradients_too_large_to_inline_go_to_an_artifact(small_client):
    loss = adjointdpm.ServerLoss("classifier", params={"label": 3})
    # 1 058 736 parameters: 4.0 MiB of float32 gradients, over the 2 MiB message limit
    stored = small_client.compute_gradient(loss, targets=["weights"], seed=0, steps=3,
                                           weights={"parameters": ["unet.down_blocks.*"], "inline": True})
    assert stored.weight_gradients == {}
    assert stored.weights_artifact is not None and stored.weights_artifact.id
    assert stored.weights_artifact.kind == "weight_gradients"
    info, data = small_client.download_artifact(stored.weights_artifact.id)
    assert info.id == stored.weights_artifact.id and len(data) == info.size > 2 << 20
    from safetensors.numpy import load

    tensors = load(data)
    assert sum(t.size for t in tensors.values()) == 1_058_736
    assert all(np.isfinite(t).all() for t in tensors.values())
    # small enough: inline, as asked
    inline = small_client.compute_gradient(loss, targets=["weights"], seed=0, steps=3,
                                           weights={"parameters": ["unet.conv_in.*"], "inline": True})
    assert set(inline.weight_gradients) == {"unet.conv_in.weight", "unet.conv_in.bias"}
    assert not inline.weights_artifact or not inline.weights_artifact.id


def test_artifacts_download_under_a_1_mib_message_limit(tmp_path):
    srv = build_server(ServerConfig(models=("digits",), port=0, artifact_dir=tmp_path,
                                    limits=Limits(max_message_bytes=1 << 20)))
    try:
        with adjointdpm.Client(f"127.0.0.1:{srv.port}", timeout=60) as client:
            loss = adjointdpm.ServerLoss("classifier", params={"label": 3})
            stored = client.compute_gradient(loss, targets=["weights"], seed=0, steps=3,
                                             weights={"parameters": ["unet.down_blocks.1.*"],
                                                      "inline": True})
            assert stored.weight_gradients == {} and stored.weights_artifact.id  # routed
            info, data = client.download_artifact(stored.weights_artifact.id)
            assert len(data) == info.size > 1 << 20
    finally:
        srv.stop(0)


def test_client_deadlines_are_counted_deadline_exceeded(server, stub):
    """A call that ran out of the client's time is counted as the client saw it, not CANCELLED."""
    _wait_idle(server)
    before = _metrics(server.metrics_port)
    for k in range(3):
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Sample(pb.SampleRequest(generation=pb.Generation(seed=k, steps=200, batch=2)),
                             timeout=0.7))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_idle(server)
    deadline = time.monotonic() + 10

    def delta(code):
        return _metrics(server.metrics_port).get(("Sample", code), 0) - before.get(("Sample", code), 0)

    while delta("DEADLINE_EXCEEDED") < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert delta("DEADLINE_EXCEEDED") == 3 and delta("CANCELLED") == 0


def test_an_overlong_artifact_name_is_refused_before_the_work(server, client):
    calls = _engine_calls(server)
    err = _refused(client.finetune_weights, adjointdpm.ServerLoss("classifier", {"label": 3}),
                   [{"seed": 0, "label": 1}], iterations=1, steps=3, name="n" * 10_000)
    assert err.code == INVALID and "name must be at most 256 characters" in err.details
    assert _engine_calls(server) == calls
