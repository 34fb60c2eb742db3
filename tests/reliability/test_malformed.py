"""≥ 1000 hypothesis-generated malformed requests: each gets the right status, none crashes the
server, and it stays healthy. Each request is a small valid one with exactly one fault."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adjointdpm.v1 import adjointdpm_pb2 as pb
from adjointdpm.v1 import adjointdpm_pb2_grpc as pb_grpc
from adjointdpm.v1 import tensor_pb2
from adjointdpm_server.config import Limits, ServerConfig
from adjointdpm_server.wire import build_server

LIMITS = Limits(max_batch=4, max_steps=50, max_iterations=20, max_examples=8, max_tensor_elements=4096)


def f32(shape, fill=0.0):
    return tensor_pb2.Tensor(dtype="float32", shape=list(shape), data=np.full(shape, fill, "<f4").tobytes())


def mse_term():
    return pb.LossTerm(server=pb.ServerLoss(name="mse", tensors={"target": f32((1, 8, 8))}))


# -- faults: (name, mutate(gen, draw) -> expected code) on the Generation ------------------------
def _tensor_fault(draw) -> tensor_pb2.Tensor:
    kind = draw(st.sampled_from(["dtype", "bytes", "negative", "rank", "huge", "int"]))
    if kind == "dtype":
        return tensor_pb2.Tensor(dtype=draw(st.text(max_size=12).filter(
            lambda s: s not in ("float16", "float32", "float64", "int32", "int64", "uint8", "bool"))),
            shape=[1], data=b"\0" * 4)
    if kind == "bytes":
        n = draw(st.integers(0, 300).filter(lambda n: n != 256))
        return tensor_pb2.Tensor(dtype="float32", shape=[1, 1, 8, 8], data=b"\0" * n)
    if kind == "negative":
        return tensor_pb2.Tensor(dtype="float32", shape=[1, -draw(st.integers(1, 2**40)), 8, 8])
    if kind == "rank":
        return tensor_pb2.Tensor(dtype="float32", shape=[1] * draw(st.integers(9, 20)), data=b"\0" * 4)
    if kind == "huge":
        dims = draw(st.lists(st.integers(2**10, 2**31), min_size=2, max_size=4))
        return tensor_pb2.Tensor(dtype="float32", shape=dims, data=b"\0" * draw(st.integers(0, 64)))
    return tensor_pb2.Tensor(dtype="int64", shape=[1, 1, 8, 8], data=b"\0" * 512)


def gen_fault(gen: pb.Generation, draw) -> str:
    fault = draw(st.sampled_from([
        "x_T_tensor", "cond_tensor", "x_T_shape", "x_T_nan", "batch", "steps", "solver", "grid",
        "label", "labels_count", "model", "adapter_bad", "adapter_unknown", "embedding_unknown",
        "t_start_alone", "t_start_range", "guidance", "prompt", "cond_shape"]))
    if fault == "x_T_tensor":
        gen.start_latents.CopyFrom(_tensor_fault(draw))
    elif fault == "cond_tensor":
        gen.cond.CopyFrom(_tensor_fault(draw))
    elif fault == "x_T_shape":
        shape = draw(st.lists(st.integers(1, 9), min_size=1, max_size=5).filter(lambda s: s[1:] != [1, 8, 8]))
        gen.start_latents.CopyFrom(f32(shape))
    elif fault == "x_T_nan":
        gen.start_latents.CopyFrom(f32((1, 1, 8, 8), draw(st.sampled_from([math.nan, math.inf, -math.inf]))))
    elif fault == "batch":
        gen.batch = draw(st.integers(LIMITS.max_batch + 1, 2**32 - 1))
    elif fault == "steps":
        gen.steps = draw(st.integers(LIMITS.max_steps + 1, 2**32 - 1))
    elif fault == "solver":
        gen.solver = draw(st.text(min_size=1, max_size=10).filter(
            lambda s: s not in ("euler", "ddim", "dpm1", "dpm2", "dpm3", "ab2", "ab3", "ab4", "heun", "dopri5")))
    elif fault == "grid":
        gen.grid = draw(st.text(min_size=1, max_size=10).filter(lambda s: s not in ("logsnr", "time", "karras")))
    elif fault == "label":
        gen.labels[:] = [draw(st.one_of(st.integers(-2**31, -1), st.integers(10, 2**31 - 1)))]
    elif fault == "labels_count":
        gen.batch = 2
        gen.labels[:] = [1] * draw(st.integers(3, 6))
    elif fault == "model":
        gen.model = draw(st.text(min_size=1, max_size=20).filter(lambda s: s != "digits"))
        return "NOT_FOUND"
    elif fault == "adapter_bad":
        gen.adapter = draw(st.text(min_size=1, max_size=40))
    elif fault == "adapter_unknown":
        gen.adapter = "lora-" + draw(st.text("0123456789abcdef", min_size=32, max_size=32))
        return "NOT_FOUND"
    elif fault == "embedding_unknown":
        gen.embedding = "embedding-" + draw(st.text("0123456789abcdef", min_size=32, max_size=32))
        return "NOT_FOUND"
    elif fault == "t_start_alone":
        gen.t_start = draw(st.floats(1, 900))
    elif fault == "t_start_range":
        gen.start_latents.CopyFrom(f32((1, 1, 8, 8)))
        gen.t_start = draw(st.one_of(st.floats(max_value=0, allow_nan=False), st.floats(1e4, 1e30)))
    elif fault == "guidance":
        gen.guidance_scale = draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e6]))
    elif fault == "prompt":
        gen.prompt[:] = [draw(st.text(min_size=2, max_size=20))]
    else:  # cond_shape
        gen.cond.CopyFrom(f32(draw(st.sampled_from([(1, 191), (2, 3), (1, 1, 8, 8)]))))
    return "INVALID_ARGUMENT"


def loss_fault(draw) -> list[pb.LossTerm]:
    fault = draw(st.sampled_from(["none", "unknown", "params", "target", "domain", "weight", "empty"]))
    if fault == "none":
        return []
    if fault == "unknown":
        name = draw(st.text(min_size=1, max_size=12).filter(
            lambda s: s not in ("mse", "classifier", "gram_style", "triton", "clip_similarity")))
        return [pb.LossTerm(server=pb.ServerLoss(name=name))]
    if fault == "params":
        term = pb.LossTerm(server=pb.ServerLoss(name="classifier"))
        term.server.params.update({"label": draw(st.one_of(st.text(max_size=5), st.integers(10, 99),
                                                         st.floats(0.1, 0.9)))})
        return [term]
    if fault == "target":
        shape = draw(st.sampled_from([(3, 3), (2, 1, 8, 9), (8,)]))
        return [pb.LossTerm(server=pb.ServerLoss(name="mse", tensors={"target": f32(shape)}))]
    if fault == "domain":
        term = mse_term()
        term.domain = draw(st.integers(3, 1000))  # 0 reads as DOMAIN_IMAGE; 1, 2 are domains
        return [term]
    if fault == "weight":
        term = mse_term()
        term.weight = draw(st.sampled_from([math.nan, math.inf]))
        return [term]
    return [pb.LossTerm()]  # neither client nor server


@st.composite
def malformed(draw):
    rpc = draw(st.sampled_from(["Sample", "ComputeGradient", "OptimizeLatent", "FinetuneWeights",
                                "OptimizeEmbedding"]))
    gen = pb.Generation(seed=draw(st.integers(0, 2**63)), steps=draw(st.integers(1, 2)),
                        batch=draw(st.integers(1, 2)))
    # generation faults where the generation is used as given (fine-tunes build theirs from
    # examples; OptimizeEmbedding refuses a given cond/embedding: what it learns)
    where = {"Sample": "generation", "FinetuneWeights": "request", "OptimizeEmbedding": "request"}.get(
        rpc) or draw(st.sampled_from(["generation", "request"]))
    code = "INVALID_ARGUMENT"
    losses, extra = [mse_term()], {}
    if where == "generation":
        code = gen_fault(gen, draw)
    elif rpc == "ComputeGradient":
        pick = draw(st.sampled_from(["losses", "grad_mode", "target"]))
        if pick == "losses":
            losses = loss_fault(draw)
        elif pick == "grad_mode":
            extra["grad_mode"] = draw(st.text(min_size=1, max_size=10).filter(
                lambda s: s not in ("checkpoint", "adjoint", "backprop")))
        else:
            extra["targets"] = [draw(st.integers(5, 1000))]  # 0 reads as TARGET_X_T, 1-4 are targets
    elif rpc == "OptimizeLatent":
        pick = draw(st.sampled_from(["losses", "iterations", "lr", "optimizer", "constraint"]))
        opt = pb.Optimizer(iterations=1)
        if pick == "losses":
            losses = loss_fault(draw)
        elif pick == "iterations":
            opt.iterations = draw(st.integers(LIMITS.max_iterations + 1, 2**32 - 1))
        elif pick == "lr":
            opt.lr = draw(st.sampled_from([-1.0, math.nan, math.inf, -1e-9]))
        elif pick == "optimizer":
            opt.name = draw(st.text(min_size=1, max_size=8).filter(lambda s: s not in ("adam", "sgd")))
        else:
            extra["constraint"] = pb.Constraint(norm=draw(st.sampled_from(["linf", "l2", "l1", "box"])),
                                                epsilon=0.0)
        extra["optimizer"] = opt
    elif rpc == "FinetuneWeights":
        pick = draw(st.sampled_from(["examples", "method", "resume", "iterations", "rank"]))
        examples = [pb.FinetuneExample(seed=k) for k in range(2)]
        opt = pb.Optimizer(iterations=1)
        if pick == "examples":
            examples = [pb.FinetuneExample(seed=k) for k in range(draw(st.sampled_from([0, 9, 50])))]
        elif pick == "method":
            extra["method"] = draw(st.text(min_size=1, max_size=8).filter(lambda s: s not in ("lora", "full")))
        elif pick == "resume":
            extra["resume_from"] = draw(st.text(min_size=1, max_size=40))
        elif pick == "iterations":
            opt.iterations = draw(st.integers(LIMITS.max_iterations + 1, 10**6))
        else:
            extra["target_modules"] = [draw(st.text(min_size=1, max_size=8).filter(lambda s: s not in ("to_q", "to_k", "to_v")))]
        extra.update(examples=examples, optimizer=opt)
    else:  # OptimizeEmbedding
        pick = draw(st.sampled_from(["losses", "target_image", "iterations"]))
        opt = pb.Optimizer(iterations=1)
        if pick == "losses":
            losses = loss_fault(draw)  # [] with no target image: nothing to learn from
        elif pick == "target_image":
            extra["target_image"] = f32(draw(st.sampled_from([(3, 8, 8), (1, 9, 9), (5,)])))
        else:
            opt.iterations = draw(st.integers(LIMITS.max_iterations + 1, 10**6))
        extra["optimizer"] = opt
    return rpc, gen, losses, extra, code


def _send(stub, rpc, gen, losses, extra):
    if rpc == "Sample":
        return list(stub.Sample(pb.SampleRequest(generation=gen), timeout=60))
    request_type, wrapper = {
        "ComputeGradient": (pb.GradientSpec, pb.ComputeGradientRequest),
        "OptimizeLatent": (pb.OptimizeLatentSpec, pb.OptimizeLatentRequest),
        "FinetuneWeights": (pb.FinetuneWeightsSpec, pb.FinetuneWeightsRequest),
        "OptimizeEmbedding": (pb.OptimizeEmbeddingSpec, pb.OptimizeEmbeddingRequest),
    }[rpc]
    request = request_type(generation=gen, losses=losses, **extra)
    return list(getattr(stub, rpc)(iter([wrapper(spec=request)]), timeout=60))


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    srv = build_server(ServerConfig(models=("digits",), port=0, limits=LIMITS, max_active_jobs=2,
                                    artifact_dir=tmp_path_factory.mktemp("artifacts")))
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    yield pb_grpc.AdjointDPMServiceStub(channel), srv
    channel.close()
    srv.stop(0)


def test_malformed_requests_get_the_right_status(stub):
    s, srv = stub
    calls = []

    @settings(max_examples=1000, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=malformed())
    def one(case):
        rpc, gen, losses, extra, code = case
        with pytest.raises(grpc.RpcError) as err:
            _send(s, rpc, gen, losses, extra)
        assert err.value.code().name == code, (rpc, err.value.details())
        assert err.value.details()  # a message a user can act on
        calls.append(rpc)

    one()
    assert len(calls) >= 1000 and len(set(calls)) == 5
    events = list(s.Sample(pb.SampleRequest(generation=pb.Generation(seed=0, steps=2)), timeout=60))
    assert events[-1].WhichOneof("kind") == "result"  # still serving
    assert srv.service.idle  # no job left behind
