"""Results: the result event becomes SampleResult / GradientResult / OptimizeResult with numpy
arrays decoded; iterations, checkpoints and validations are recorded on the Call (and the
OptimizeResult); ``stream=True`` yields the events in order and sets ``call.result`` at the end;
``on_event`` sees every event."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import struct_pb2

import adjointdpm
from adjointdpm import encode_tensor
from adjointdpm.v1 import adjointdpm_pb2 as pb

from ._fake import Event, Query, event

RNG = np.random.default_rng(0)
X0 = RNG.standard_normal((2, 1, 4, 4)).astype(np.float32)
XT = RNG.standard_normal((2, 1, 4, 4)).astype(np.float32)
PIX = RNG.random((2, 3, 8, 8)).astype(np.float32)
GRAD = RNG.standard_normal((2, 1, 4, 4)).astype(np.float32)
COND = RNG.standard_normal((2, 16)).astype(np.float64)   # dtypes travel as they are
W = RNG.standard_normal((3, 3)).astype(np.float16)


def _struct(d):
    s = struct_pb2.Struct()
    s.update(d)
    return s


def _artifact(id, kind, iteration=0, **meta):
    return pb.ArtifactInfo(id=id, kind=kind, model="digits", size=123, name="run", iteration=iteration,
                           metadata=_struct(meta) if meta else None)


def _eq(a, b):
    return isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def test_sample_result(sdk, fake):
    fake.script("Sample", [event(result=pb.SampleResult(
        images=[b"png-0", b"png-1"], x0=encode_tensor(X0), start_latents=encode_tensor(XT), pixels=encode_tensor(PIX)))])
    r = sdk.call("sample", labels=[1, 2], pixels=True)
    assert isinstance(r, adjointdpm.SampleResult)
    assert r.images == [b"png-0", b"png-1"]
    assert _eq(r.x0, X0) and _eq(r.x_T, XT) and _eq(r.pixels, PIX)


def test_sample_result_without_pixels(sdk, fake):
    fake.script("Sample", [event(result=pb.SampleResult(x0=encode_tensor(X0), start_latents=encode_tensor(XT)))])
    r = sdk.call("sample")
    assert r.pixels is None and r.images == []
    assert r.x0.flags.writeable  # decoded arrays are the caller's to change


def test_gradient_result(sdk, fake):
    fake.script("ComputeGradient", [event(result=pb.GradientResult(
        loss=2.5, loss_terms=[2.0, 0.5], x0=encode_tensor(X0), images=[b"png"],
        gradients={"x_T": encode_tensor(GRAD), "cond": encode_tensor(COND)},
        weight_gradients={"unet.conv.weight": encode_tensor(W)},
        weights_artifact=_artifact("wg-1", "weight_gradients", rank=4), nfe=42,
        sample_losses=[1.0, 1.5]))])
    r = sdk.call("compute_gradient", adjointdpm.ServerLoss("s"), targets=["x_T", "cond", "weights"])
    assert isinstance(r, adjointdpm.GradientResult)
    assert (r.loss, r.loss_terms, r.nfe, r.sample_losses, r.images) == (2.5, [2.0, 0.5], 42, [1.0, 1.5], [b"png"])
    assert _eq(r.x0, X0)
    assert set(r.gradients) == {"x_T", "cond"}
    assert _eq(r.gradients["x_T"], GRAD) and _eq(r.gradients["cond"], COND)
    assert _eq(r.weight_gradients["unet.conv.weight"], W)
    assert r.weights_artifact == adjointdpm.ArtifactInfo("wg-1", "weight_gradients", "digits", 123, "run", 0,
                                                         {"rank": 4.0})


def test_gradient_result_without_an_artifact(sdk, fake):
    fake.script("ComputeGradient", [event(result=pb.GradientResult(loss=1.0, x0=encode_tensor(X0)))])
    r = sdk.call("compute_gradient", adjointdpm.ServerLoss("s"))
    assert r.weights_artifact is None and r.gradients == {} and r.weight_gradients == {}


def _run_events(rpc: str = "FinetuneWeights"):
    """A run as the server streams it: queue, progress, iterations, and (a fine-tune's only)
    checkpoints and validations."""
    events = [
        event(queued=pb.QueuePosition(position=2)),
        event(queued=pb.QueuePosition(position=0)),
        event(progress=pb.Progress(phase="forward", step=1, total=2, t=0.5, nfe=3, iteration=0)),
        event(iteration=pb.Iteration(iteration=0, loss=3.0, loss_terms=[3.0], grad_norm=0.7,
                                        images=[b"it0"], sample_losses=[1.0, 2.0], start_latents=encode_tensor(XT),
                                        stopped=[False, True], lr=0.05)),
        event(validation=pb.Validation(iteration=1, loss=2.5, loss_terms=[2.5], agreement=0.75,
                                          images=[b"v1"], best=True)),
        event(checkpoint=_artifact("ckpt-1", "checkpoint", iteration=1)),
        event(iteration=pb.Iteration(iteration=1, loss=2.0, loss_terms=[2.0], grad_norm=0.5, lr=0.025)),
        event(validation=pb.Validation(iteration=2, loss=2.6)),
        event(checkpoint=_artifact("ckpt-2", "checkpoint", iteration=2, step=2)),
    ]
    finetune_only = ("validation", "checkpoint")
    return events if rpc == "FinetuneWeights" else [e for e in events if e.kind not in finetune_only]


def _optimized():
    return event(result=pb.OptimizeResult(
        loss=2.0, history=[3.0, 2.0], start_latents=encode_tensor(XT), x0=encode_tensor(X0), images=[b"final"],
        initial_images=[b"start"], artifact=_artifact("lora-1", "lora"), sample_losses=[0.5, 1.5],
        best_iteration=[1, 0], stopped=[False, True], iterations_run=2, last_start_latents=encode_tensor(GRAD)))


def _check_run_records(holder, rpc: str = "FinetuneWeights"):
    assert [i.iteration for i in holder.iterations] == [0, 1]
    first = holder.iterations[0]
    assert isinstance(first, adjointdpm.IterationRecord)
    assert (first.loss, first.loss_terms, first.grad_norm, first.sample_losses, first.lr, first.stopped,
            first.images) == (3.0, [3.0], pytest.approx(0.7), [1.0, 2.0], 0.05, [False, True], [b"it0"])
    assert _eq(first.x_T, XT) and holder.iterations[1].x_T is None
    if rpc != "FinetuneWeights":  # its response declares no checkpoint or validation events
        assert holder.checkpoints == [] and holder.validations == []
        return
    assert [c.id for c in holder.checkpoints] == ["ckpt-1", "ckpt-2"]
    assert holder.checkpoints[1] == adjointdpm.ArtifactInfo("ckpt-2", "checkpoint", "digits", 123, "run", 2,
                                                            {"step": 2.0})
    v1, v2 = holder.validations
    assert isinstance(v1, adjointdpm.ValidationRecord)
    assert (v1.iteration, v1.loss, v1.loss_terms, v1.agreement, v1.best, v1.images) == (1, 2.5, [2.5], 0.75, True, [b"v1"])
    assert v2.agreement is None and v2.best is False   # unset agreement: None, not 0


@pytest.mark.parametrize("method,rpc", [("optimize_latent", "OptimizeLatent"),
                                        ("finetune_weights", "FinetuneWeights"),
                                        ("optimize_embedding", "OptimizeEmbedding")])
def test_optimize_result_and_the_run_records(sdk, fake, method, rpc):
    fake.script(rpc, _run_events(rpc) + [_optimized()])
    args = {"finetune_weights": (adjointdpm.ServerLoss("s"), [{"seed": 0}]),
            "optimize_embedding": ()}.get(method, (adjointdpm.ServerLoss("s"),))
    r = sdk.call(method, *args)
    assert isinstance(r, adjointdpm.OptimizeResult)
    assert (r.loss, r.history, r.images, r.initial_images, r.sample_losses, r.best_iteration, r.stopped,
            r.iterations_run) == (2.0, [3.0, 2.0], [b"final"], [b"start"], [0.5, 1.5], [1, 0], [False, True], 2)
    assert _eq(r.x_T, XT) and _eq(r.x0, X0) and _eq(r.last_x_T, GRAD)
    assert r.artifact == adjointdpm.ArtifactInfo("lora-1", "lora", "digits", 123, "run", 0, {})
    _check_run_records(r, rpc)


def test_stream_yields_events_in_order_and_sets_the_result_at_the_end(sdk, fake):
    events = _run_events() + [_optimized()]
    fake.script("FinetuneWeights", events)
    seen, call = sdk.stream("finetune_weights", adjointdpm.ServerLoss("s"), [{"seed": 0}], progress=False)
    assert [e for e, _ in seen] == [e.response("FinetuneWeights") for e in events]
    assert all(result is None for _, result in seen[:-1])    # no result before the result event
    assert isinstance(seen[-1][1], adjointdpm.OptimizeResult)
    assert isinstance(call.result, adjointdpm.OptimizeResult) and call.result.loss == 2.0
    _check_run_records(call)
    _check_run_records(call.result)


def test_stream_of_a_bidi_call_includes_the_loss_queries(sdk, fake):
    x = np.ones((1, 1, 4, 4), np.float32)
    fake.script("ComputeGradient", [event(progress=pb.Progress(phase="forward", step=1, total=1)),
                                    Query(term=0, x=x, iteration=0),
                                    event(progress=pb.Progress(phase="backward", step=1, total=1)),
                                    event(result=pb.GradientResult(loss=4.0, x0=encode_tensor(X0)))])
    loss = adjointdpm.ClientLoss(lambda a: (float(a.sum()), np.ones_like(a)), autograd=False)
    seen, call = sdk.stream("compute_gradient", loss)
    assert [e.WhichOneof("kind") for e, _ in seen] == ["progress", "loss_query", "progress", "result"]
    assert seen[1][0].loss_query.term == 0
    assert isinstance(call.result, adjointdpm.GradientResult) and call.result.loss == 4.0
    assert fake.only("ComputeGradient").replies[0].value == 16.0


@pytest.mark.parametrize("stream", [False, True])
def test_on_event_sees_every_event(sdk, fake, stream):
    x = np.ones((1, 1, 4, 4), np.float32)
    script = ([event(queued=pb.QueuePosition(position=1)), Query(term=0, x=x)] + _run_events("OptimizeLatent")
              + [_optimized()])
    fake.script("OptimizeLatent", script)
    got = []
    loss = adjointdpm.ClientLoss(lambda a: (0.0, np.zeros_like(a)), autograd=False)
    if stream:
        seen, call = sdk.stream("optimize_latent", loss, on_event=got.append)
        assert got == [e for e, _ in seen]
    else:
        sdk.call("optimize_latent", loss, on_event=got.append)
    assert got == [(s if isinstance(s, Event) else s.event()).response("OptimizeLatent") for s in script]


def test_a_progress_bar_does_not_change_the_result(sdk, fake):
    events = [event(progress=pb.Progress(phase=phase, step=k, total=3, nfe=k, iteration=0))
              for phase in ("forward", "backward") for k in range(1, 4)]
    fake.script("Sample", events + [event(result=pb.SampleResult(x0=encode_tensor(X0), start_latents=encode_tensor(XT)))])
    r = sdk.call("sample", progress=True)
    assert _eq(r.x0, X0)
