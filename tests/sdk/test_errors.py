"""Errors and cancellation: a status the servicer sets with ``context.abort`` is an AdjointDPMError
with the same code and details; a stream without a result raises (UNKNOWN); leaving a stream
(break, an exception, a cancelled task) cancels the RPC while the channel is still open."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

import adjointdpm
import adjointdpm.aio
from adjointdpm.v1 import adjointdpm_pb2 as pb

from ._fake import Abort, Hold, Query, event, result_event

METHODS = {"sample": "Sample", "compute_gradient": "ComputeGradient", "optimize_latent": "OptimizeLatent",
           "finetune_weights": "FinetuneWeights", "optimize_embedding": "OptimizeEmbedding"}
X = np.ones((1, 1, 4, 4), np.float32)
PROGRESS = event(progress=pb.Progress(phase="forward", step=1, total=4))
LOSS = adjointdpm.ClientLoss(lambda x: (float(x.sum()), np.ones_like(x)), name="sum", autograd=False)


def _args(method):
    return {"sample": (), "finetune_weights": (LOSS, [{"seed": 0}]),
            "optimize_embedding": ([LOSS],)}.get(method, (LOSS,))


CODES = [(grpc.StatusCode.INVALID_ARGUMENT, "optimizer.lr must be > 0; got 0"),
         (grpc.StatusCode.NOT_FOUND, "no model 'nope' (digits, gaussian-mixture)"),
         (grpc.StatusCode.RESOURCE_EXHAUSTED, "the queue is full (8 jobs)"),
         (grpc.StatusCode.UNAUTHENTICATED, "a bearer token is required"),
         (grpc.StatusCode.INTERNAL, "solver diverged: NaN at step 3")]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("code,details", CODES[:2], ids=["invalid", "not-found"])
def test_a_status_becomes_adjointdpm_error(sdk, fake, method, code, details):
    fake.script(METHODS[method], [PROGRESS, Abort(code, details)])
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        sdk.call(method, *_args(method))
    assert isinstance(err.value, RuntimeError)
    assert (err.value.code, err.value.details) == (code, details)
    assert str(err.value) == f"{code.name}: {details}"


@pytest.mark.parametrize("code,details", CODES, ids=[c.name for c, _ in CODES])
def test_every_code_keeps_its_code_and_details_mid_protocol(sdk, fake, code, details):
    """After a loss query was answered, a status still arrives as itself."""
    fake.script("OptimizeLatent", [Query(term=0, x=X), PROGRESS, Abort(code, details)])
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        sdk.call("optimize_latent", LOSS)
    assert (err.value.code, err.value.details) == (code, details)
    assert len(fake.only("OptimizeLatent").replies) == 1


@pytest.mark.parametrize("method", ["sample", "compute_gradient"])
def test_stream_yields_the_events_before_the_status_then_raises(fake, fake_server, method):
    fake.script(METHODS[method], [PROGRESS, PROGRESS, Abort(grpc.StatusCode.ABORTED, "preempted")])
    got = []
    with adjointdpm.Client(fake_server.target) as c:
        call = getattr(c, method)(*_args(method), stream=True)
        with pytest.raises(adjointdpm.AdjointDPMError) as err:
            for event in call:
                got.append(event)
    assert got == [PROGRESS.response(METHODS[method])] * 2
    assert (err.value.code, err.value.details) == (grpc.StatusCode.ABORTED, "preempted")
    assert call.result is None


def test_aio_stream_yields_the_events_before_the_status_then_raises(fake, fake_server):
    fake.script("Sample", [PROGRESS, Abort(grpc.StatusCode.ABORTED, "preempted")])

    async def main():
        got = []
        async with adjointdpm.aio.Client(fake_server.target) as c:
            with pytest.raises(adjointdpm.AdjointDPMError) as err:
                async for event in c.sample(stream=True):
                    got.append(event)
        return got, err.value

    got, err = asyncio.run(main())
    assert got == [PROGRESS.response("Sample")] and (err.code, err.details) == (grpc.StatusCode.ABORTED, "preempted")


@pytest.mark.parametrize("method", list(METHODS))
def test_a_stream_that_ends_without_a_result_raises(sdk, fake, method):
    fake.script(METHODS[method], [PROGRESS])
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        sdk.call(method, *_args(method))
    assert (err.value.code, err.value.details) == (grpc.StatusCode.UNKNOWN, "the stream ended without a result")


def test_iterating_a_stream_without_a_result_ends_with_no_result(sdk, fake):
    """Iteration itself does not raise (the events were all delivered); ``call.result`` stays None."""
    fake.script("Sample", [PROGRESS])
    seen, call = sdk.stream("sample")
    assert [e for e, _ in seen] == [PROGRESS.response("Sample")] and call.result is None


@pytest.mark.parametrize("name", ["list_models", "list_losses", "download_artifact"])
def test_a_status_of_a_unary_call(sdk, fake, name):
    fake.unary_abort = Abort(grpc.StatusCode.PERMISSION_DENIED, "not for you")
    args = ("art-1",) if name == "download_artifact" else ()
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        sdk.call(name, *args)
    assert (err.value.code, err.value.details) == (grpc.StatusCode.PERMISSION_DENIED, "not for you")


def test_the_timeout_is_a_deadline(sdk, fake):
    fake.script("ComputeGradient", [PROGRESS, Hold()])
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        sdk.call("compute_gradient", LOSS, _client={"timeout": 0.3})
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    remaining = fake.only("ComputeGradient").time_remaining
    assert remaining is not None and 0 < remaining <= 0.5  # 0.3 s, rounded up by gRPC


def test_an_unreachable_server_is_unavailable(sdk, free_ports):
    (port,) = free_ports(1)
    sdk.target = f"127.0.0.1:{port}"
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        sdk.call("sample", _client={"timeout": 5})
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


# ---- cancellation --------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["sample", "compute_gradient", "finetune_weights"])
def test_breaking_out_of_a_stream_cancels_the_rpc(fake, fake_server, method):
    rpc = METHODS[method]
    fake.script(rpc, ([] if method == "sample" else [Query(term=0, x=X)]) + [PROGRESS, PROGRESS, Hold()])
    with adjointdpm.Client(fake_server.target) as c:
        call = getattr(c, method)(*_args(method), stream=True)
        for event in call:
            if event.WhichOneof("kind") == "progress":
                break
        assert fake.cancelled.wait(5), "breaking out did not cancel the RPC"
        assert call.result is None
    assert fake.only(rpc).cancelled


def test_call_cancel_ends_the_iteration_with_cancelled(fake, fake_server):
    fake.script("OptimizeLatent", [PROGRESS, Hold()])
    with adjointdpm.Client(fake_server.target) as c:
        call = c.optimize_latent(LOSS, stream=True)
        with pytest.raises(adjointdpm.AdjointDPMError) as err:
            for _ in call:
                call.cancel()
        assert fake.cancelled.wait(5)
    assert err.value.code == grpc.StatusCode.CANCELLED


@pytest.mark.parametrize("method", ["sample", "compute_gradient"])
def test_an_exception_in_on_event_cancels_the_rpc(sdk, fake, method):
    fake.script(METHODS[method], [PROGRESS, Hold()])

    def on_event(event):
        raise KeyError("stop here")

    seen = []
    with pytest.raises(KeyError, match="stop here"):
        sdk.call(method, *_args(method), on_event=on_event,
                 _before_close=lambda: seen.append(fake.cancelled.wait(5)))
    assert seen == [True]


@pytest.mark.parametrize("method", ["sample", "compute_gradient"])
def test_aio_cancelling_the_awaiting_task_cancels_the_rpc(fake, fake_server, method):
    rpc = METHODS[method]
    fake.script(rpc, ([] if method == "sample" else [Query(term=0, x=X)]) + [PROGRESS, Hold()])
    ready = fake.started if method == "sample" else fake.replied   # mid-protocol for the bidi one

    async def main():
        async with adjointdpm.aio.Client(fake_server.target) as c:
            task = asyncio.create_task(getattr(c, method)(*_args(method)))
            assert await asyncio.to_thread(ready.wait, 5)
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return await asyncio.to_thread(fake.cancelled.wait, 5)  # the channel is still open

    assert asyncio.run(main()), "cancelling the task did not cancel the RPC"
    assert fake.only(rpc).cancelled


@pytest.mark.parametrize("method", ["sample", "compute_gradient"])
def test_aio_breaking_out_of_a_stream_cancels_the_rpc(fake, fake_server, method):
    fake.script(METHODS[method], [PROGRESS, PROGRESS, Hold()])

    async def main():
        async with adjointdpm.aio.Client(fake_server.target) as c:
            call = getattr(c, method)(*_args(method), stream=True)
            async for _ in call:
                break
            cancelled = await asyncio.to_thread(fake.cancelled.wait, 5)
            return cancelled, call.result

    cancelled, result = asyncio.run(main())
    assert cancelled and result is None


def test_a_finished_call_is_not_cancelled(sdk, fake):
    """The control for the tests above: a call that got its result ends normally."""
    fake.script("ComputeGradient", [Query(term=0, x=X), result_event("ComputeGradient")])
    sdk.call("compute_gradient", LOSS, _before_close=lambda: None)
    received = fake.only("ComputeGradient")
    assert received.finished and not received.cancelled and not fake.cancelled.is_set()
