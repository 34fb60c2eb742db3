"""What the servicer receives: every streaming method's keywords land in their fields, keywords
left out stay unset (so the server applies ``adjointdpm.options``' defaults), the dict keywords
(stop_when, guided, token, weights) set their sub-message, and a wrong keyword is a TypeError
before anything is sent."""

from __future__ import annotations

import asyncio
import inspect

import numpy as np
import pytest
from google.protobuf import struct_pb2

import adjointdpm
import adjointdpm.aio
from adjointdpm import encode_tensor, options
from adjointdpm.v1 import adjointdpm_pb2 as pb

RPC = {"sample": "Sample", "compute_gradient": "ComputeGradient", "optimize_latent": "OptimizeLatent",
       "finetune_weights": "FinetuneWeights", "optimize_embedding": "OptimizeEmbedding"}
SERVER_LOSS = adjointdpm.ServerLoss("classifier")
EXAMPLES = [{"seed": 1}]


def _inputs(method: str) -> tuple:
    """The positional inputs of ``method``: a server loss (and examples)."""
    return {"sample": (), "finetune_weights": (SERVER_LOSS, EXAMPLES),
            "optimize_embedding": ()}.get(method, (SERVER_LOSS,))


def _server_term(name="classifier", params=None, tensors=None, weight=1.0, domain=pb.DOMAIN_IMAGE):
    struct = struct_pb2.Struct()
    struct.update(params or {})
    return pb.LossTerm(weight=weight, domain=domain, server=pb.ServerLoss(
        name=name, params=struct, tensors={k: encode_tensor(v) for k, v in (tensors or {}).items()}))


def _numpy_loss(x):
    return float(np.sum(x)), np.ones_like(x)


# ---- every keyword, by hand: the exact message ----------------------------------------------------

def test_sample_keywords_land_in_their_fields(sdk, fake):
    x_T, cond = np.full((2, 1, 4, 4), 0.5, np.float32), np.eye(2, dtype=np.float64)
    sdk.call("sample", model="digits", adapter="lora-1", prompt="a cat", negative_prompt=["blurry"],
             labels=range(2), cond=cond, embedding="emb-1", batch=2, seed=0, x_T=x_T, steps=12,
             solver="euler", guidance_scale=2.5, grid="karras", t_start=0.5, images=False, pixels=True)
    expected = pb.SampleRequest(
        generation=pb.Generation(model="digits", adapter="lora-1", prompt=["a cat"],
                                 negative_prompt=["blurry"], labels=[0, 1],
                                 cond=encode_tensor(cond), embedding="emb-1",  # cond keeps its float64
                                 batch=2, seed=0, start_latents=encode_tensor(x_T), steps=12, solver="euler",
                                 guidance_scale=2.5, grid="karras", t_start=0.5),
        no_images=True, return_pixels=True)
    got = fake.only("Sample").request
    assert got == expected
    assert got.generation.HasField("seed") and got.generation.seed == 0  # seed 0 is a seed


def test_compute_gradient_keywords_and_loss_terms(sdk, fake):
    target = np.zeros((1, 1, 4, 4), np.float32)
    server = adjointdpm.ServerLoss("mse", params={"reduction": "sum", "scale": 2},
                                   tensors={"target": target}, weight=0.5)
    client = adjointdpm.ClientLoss(_numpy_loss, name="mine", weight=2.0, domain="latent", autograd=False)
    vec = np.arange(8, dtype=np.float32)
    sdk.call("compute_gradient", [server, client], labels=3, seed=7, steps=5,
             targets=["x_T", "cond", "token", "weights"], grad_mode="adjoint", memory_budget_mib=512,
             token={"placeholder": "<cat>", "initializer": "cat", "embedding": vec},
             weights={"parameters": ["unet.*", "*.to_q"], "lora_rank": 4, "inline": True}, images=True)
    expected = pb.GradientSpec(
        generation=pb.Generation(labels=[3], seed=7, steps=5),
        losses=[_server_term("mse", {"reduction": "sum", "scale": 2}, {"target": target}, 0.5),
                pb.LossTerm(weight=2.0, client="mine", domain=pb.DOMAIN_LATENT)],
        targets=[pb.TARGET_X_T, pb.TARGET_COND, pb.TARGET_TOKEN, pb.TARGET_WEIGHTS], grad_mode="adjoint",
        token=pb.TokenSpec(placeholder="<cat>", initializer="cat", embedding=encode_tensor(vec)),
        weights=pb.WeightsSpec(parameters=["unet.*", "*.to_q"], lora_rank=4, inline=True),
        return_images=True, memory_budget_mib=512)
    received = fake.only("ComputeGradient")
    assert received.first_kind == "spec"  # the spec goes first, in its oneof
    assert received.request == expected
    assert received.replies == []            # no query: nothing more was sent


def test_optimize_latent_keywords_guided_and_stop_when(sdk, fake):
    x_T = np.ones((1, 1, 4, 4), np.float32)
    sdk.call("optimize_latent", SERVER_LOSS, x_T=x_T, optimizer="sgd", lr=0.1, iterations=3,
             momentum=0.9, schedule="cosine", warmup=1, constraint="linf", epsilon=0.5,
             norm_weight=0.01, image_every=2, grad_mode="checkpoint", memory_budget_mib=64,
             guided={"every": 2, "scale": 0.3, "inner_steps": 2, "grad_steps": 4, "step": "raw",
                     "clip": 1.0},
             stop_when={"loss_below": 0.0, "verdict_changed": True, "patience": 2})
    expected = pb.OptimizeLatentSpec(
        generation=pb.Generation(start_latents=encode_tensor(x_T)), losses=[_server_term()],
        optimizer=pb.Optimizer(name="sgd", lr=0.1, iterations=3, momentum=0.9, schedule="cosine", warmup=1),
        constraint=pb.Constraint(norm="linf", epsilon=0.5), norm_weight=0.01, image_every=2,
        grad_mode="checkpoint", memory_budget_mib=64,
        guided=pb.GuidedSampling(every=2, scale=0.3, inner_steps=2, grad_steps=4, step="raw", clip=1.0),
        stop_when=pb.StopWhen(loss_below=0.0, verdict_changed=True, patience=2))
    got = fake.only("OptimizeLatent").request
    assert got == expected
    assert got.stop_when.HasField("loss_below")  # 0.0 is a threshold, not "unset"


def test_finetune_weights_examples_validation_and_keywords(sdk, fake):
    x1 = np.full((1, 1, 4, 4), 0.25, np.float32)
    sdk.call("finetune_weights", SERVER_LOSS, [{"seed": 1, "label": 3}, {"x_T": x1, "prompt": "a cat"}],
             validation=[{"seed": 0, "label": 0}], model="digits", method="full", lora_rank=8,
             lora_alpha=16.0, target_modules=["to_q", "to_v"], checkpoint_every=2, name="run",
             batch_size=1, resume_from="ckpt-1", keep_checkpoints=5, validate_every=2, keep_best=True,
             stop_when={"patience": 3}, lr=1e-4, iterations=4, grad_mode="backprop", memory_budget_mib=1)
    expected = pb.FinetuneWeightsSpec(
        generation=pb.Generation(model="digits"), losses=[_server_term()],
        examples=[pb.FinetuneExample(seed=1, label=3), pb.FinetuneExample(start_latents=encode_tensor(x1), prompt="a cat")],
        validation=[pb.FinetuneExample(seed=0, label=0)],
        optimizer=pb.Optimizer(lr=1e-4, iterations=4), method="full", lora_rank=8, lora_alpha=16.0,
        target_modules=["to_q", "to_v"], checkpoint_every=2, name="run", batch_size=1,
        grad_mode="backprop", resume_from="ckpt-1", keep_checkpoints=5, validate_every=2,
        keep_best=True, stop_when=pb.StopWhen(patience=3), memory_budget_mib=1)
    got = fake.only("FinetuneWeights").request
    assert got == expected
    v = got.validation[0]
    assert v.HasField("seed") and v.HasField("label")  # seed 0 and label 0 are sent
    assert not got.examples[1].HasField("seed") and not got.examples[1].HasField("label")


def test_optimize_embedding_without_losses_and_keywords(sdk, fake):
    image = np.full((1, 3, 4, 4), 0.5, np.float32)
    vec = np.zeros(8, np.float32)
    sdk.call("optimize_embedding", prompt="a photo of <cat>", target_image=image,
             token={"placeholder": "<cat>", "embedding": vec}, prior="gaussian", prior_weight=0.5,
             name="cat", image_every=1, stop_when={"loss_below": 0.1}, optimizer="adam", lr=0.02,
             schedule="linear", grad_mode="auto", memory_budget_mib=3)
    expected = pb.OptimizeEmbeddingSpec(
        generation=pb.Generation(prompt=["a photo of <cat>"]), target_image=encode_tensor(image),
        optimizer=pb.Optimizer(name="adam", lr=0.02, schedule="linear"),
        token=pb.TokenSpec(placeholder="<cat>", embedding=encode_tensor(vec)), name="cat",
        grad_mode="auto", image_every=1, prior="gaussian", prior_weight=0.5,
        stop_when=pb.StopWhen(loss_below=0.1), memory_budget_mib=3)
    got = fake.only("OptimizeEmbedding").request
    assert got == expected and len(got.losses) == 0


# ---- left out: unset on the wire; given as the signature's default: read the same ---------------

@pytest.mark.parametrize("method", list(RPC))
def test_keywords_left_out_stay_unset(sdk, fake, method):
    sdk.call(method, *_inputs(method))
    got = fake.only(RPC[method]).request
    inputs = {"losses", "examples"}
    assert [f.name for f, _ in got.ListFields() if f.name not in inputs] == []
    for group in ("stop_when", "guided", "token", "weights"):
        if group in got.DESCRIPTOR.fields_by_name:
            assert not got.HasField(group)
    rpc = RPC[method]
    assert options.read(rpc, got) == {o.path: (not o.default) if o.kind == "negated"
                                      else options.default(rpc, o.path) for o in options.options(rpc)}


@pytest.mark.parametrize("method", list(RPC))
def test_the_signature_defaults_mean_the_server_defaults(sdk, fake, method):
    """Every keyword passed as its signature default reads, on the server, as leaving it out."""
    cls = adjointdpm.Client if sdk.kind == "sync" else adjointdpm.aio.Client
    params = inspect.signature(getattr(cls, method)).parameters
    given = {name: p.default for name, p in params.items()
             if p.kind is p.KEYWORD_ONLY and p.default is not None
             and name not in ("stream", "on_event", "progress", "validation")}
    assert given  # the signature does carry the defaults
    sdk.calls(method, [(_inputs(method), {}), (_inputs(method), given)])
    rpc = RPC[method]
    left_out, explicit = (c.request for c in fake.calls)
    assert options.read(rpc, explicit) == options.read(rpc, left_out)


# ---- every keyword, one at a time: it sets its own field and nothing else -----------------------

def _value_for(o: options.Option, request):
    """A value for option ``o`` that differs from its default, and what ``options.read`` then says."""
    holder, leaf = options._field(request, o.path)
    fd = holder.DESCRIPTOR.fields_by_name[leaf]
    if o.kind == "tensor":
        value = np.full((1, 2), 0.5, np.float32)
        return value, encode_tensor(value)
    if o.kind == "targets":
        return ["cond", "token"], ["cond", "token"]
    if o.kind == "list":
        return ([7, 2], [7, 2]) if leaf == "labels" else (["zz", "yy"], ["zz", "yy"])
    if o.kind == "negated":
        return (not o.default), bool(o.default)  # images=False → no_images=True
    if o.choices:
        choice = next(c for c in o.choices if c != o.default)
        return choice, choice
    if fd.type == fd.TYPE_BOOL:
        return (not o.default), (not o.default)
    if fd.type == fd.TYPE_STRING:
        return "zz", "zz"
    if fd.type in (fd.TYPE_DOUBLE, fd.TYPE_FLOAT):
        return 0.375, 0.375
    return 7, 7


@pytest.mark.parametrize("method", list(RPC))
def test_each_keyword_sets_its_own_field_only(sdk, fake, method):
    rpc = RPC[method]
    blank = options.read(rpc, _message(rpc))
    plan = []
    for o in options.options(rpc):
        value, read_back = _value_for(o, _message(rpc))
        kwargs = {o.group: {o.name: value}} if o.group else {o.name: value}
        plan.append((o, kwargs, read_back))
    sdk.calls(method, [(_inputs(method), kwargs) for _, kwargs, _ in plan])
    assert len(fake.calls) == len(plan)
    for (o, kwargs, read_back), received in zip(plan, fake.calls):
        got = options.read(rpc, received.request)
        assert got[o.path] == read_back, (o.path, kwargs)
        changed = {path for path in got if got[path] != blank[path]}
        assert changed == {o.path}, (kwargs, changed)
        holder, leaf = options._field(received.request, o.path)
        assert not options._is_unset(holder, leaf), (o.path, kwargs)
        if o.group:
            assert received.request.HasField(o.group)


def _message(rpc: str):
    return {"Sample": pb.SampleRequest, "ComputeGradient": pb.GradientSpec,
            "OptimizeLatent": pb.OptimizeLatentSpec, "FinetuneWeights": pb.FinetuneWeightsSpec,
            "OptimizeEmbedding": pb.OptimizeEmbeddingSpec}[rpc]()


@pytest.mark.parametrize("method,group", [("optimize_latent", "guided"), ("optimize_latent", "stop_when"),
                                          ("finetune_weights", "stop_when"), ("optimize_embedding", "stop_when"),
                                          ("optimize_embedding", "token"), ("compute_gradient", "token"),
                                          ("compute_gradient", "weights")])
def test_an_empty_group_sets_its_sub_message(sdk, fake, method, group):
    """``guided={}``: guided sampling with every default, which is not "no guided sampling"."""
    sdk.call(method, *_inputs(method), **{group: {}})
    got = fake.only(RPC[method]).request
    assert got.HasField(group)
    assert getattr(got, group).ListFields() == []


# ---- a wrong keyword: TypeError, nothing sent ----------------------------------------------------

WRONG = [
    ("sample", {"lables": 3}),
    ("sample", {"stop_when": {"patience": 1}}),         # not a keyword of sample
    ("compute_gradient", {"target": ["x_T"]}),
    ("compute_gradient", {"token": {"placeholdr": "<x>"}}),
    ("compute_gradient", {"guided": {"every": 2}}),
    ("optimize_latent", {"guided": {"evry": 2}}),
    ("optimize_latent", {"stop_when": {"patience": 1, "loss_above": 2.0}}),
    ("finetune_weights", {"lora_ranks": 2}),
    ("finetune_weights", {"stop_when": {"verdict": True}}),
    ("optimize_embedding", {"weights": {"inline": True}}),
    ("optimize_embedding", {"prior_weights": 1.0}),
]


@pytest.mark.parametrize("method,kwargs", WRONG, ids=[f"{m}-{next(iter(k))}" for m, k in WRONG])
def test_a_wrong_keyword_is_a_type_error_before_anything_is_sent(fake, fake_server, method, kwargs):
    with adjointdpm.Client(fake_server.target) as c:
        with pytest.raises(TypeError):
            getattr(c, method)(*_inputs(method), **kwargs)

    async def main():
        async with adjointdpm.aio.Client(fake_server.target) as c:
            with pytest.raises(TypeError):
                getattr(c, method)(*_inputs(method), **kwargs)  # raises at the call, not at the await
    asyncio.run(main())
    assert fake.calls == []


def test_a_missing_or_extra_positional_input_is_a_type_error(fake, fake_server):
    with adjointdpm.Client(fake_server.target) as c:
        with pytest.raises(TypeError):
            c.compute_gradient()
        with pytest.raises(TypeError):
            c.finetune_weights()  # examples may be left out (a prompt set), losses not
        with pytest.raises(TypeError):
            c.finetune_weights(SERVER_LOSS, [], [])
        with pytest.raises(TypeError):
            c.sample(3)
    assert fake.calls == []
