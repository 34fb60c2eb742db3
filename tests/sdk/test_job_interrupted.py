"""A fine-tune whose stream is lost after its ``job`` event: ``JobInterrupted`` (an
AdjointDPMError) carries the job id, replica and iteration and says how to resume; the ``job``
event is seen like any other event and sets ``call.job`` / ``call.job_id``. Sync and asyncio,
against the scripted fake server (tests/sdk/_fake.py)."""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
import pytest

import adjointdpm
import adjointdpm.aio
from adjointdpm.v1 import adjointdpm_pb2 as pb

from ._fake import Abort, FakeServer, Hold, event, result_event

pytestmark = pytest.mark.timeout(30)

LOSS = adjointdpm.ClientLoss(lambda x: (float(x.sum()), np.ones_like(x)), name="sum", autograd=False)
EXAMPLES = [{"seed": 0, "label": 1}]
JOB = event(job=pb.Job(id="job-7f3a", replica="adjointdpm-1", iteration=4))
PROGRESS = event(progress=pb.Progress(phase="forward", step=1, total=4))
LOST = Abort(grpc.StatusCode.UNAVAILABLE, "the replica went away")


def _finetune(sdk, **kwargs):
    return sdk.call("finetune_weights", LOSS, EXAMPLES, iterations=3, **kwargs)


@pytest.mark.parametrize("stream", [False, True], ids=["wait", "stream"])
def test_a_lost_fine_tune_after_its_job_event_raises_job_interrupted(sdk, fake, stream):
    fake.script("FinetuneWeights", [JOB, PROGRESS, LOST])
    with pytest.raises(adjointdpm.JobInterrupted) as err:
        if stream:
            sdk.stream("finetune_weights", LOSS, EXAMPLES, iterations=3)
        else:
            _finetune(sdk)
    e = err.value
    assert isinstance(e, adjointdpm.AdjointDPMError)
    assert (e.job_id, e.replica, e.iteration) == ("job-7f3a", "adjointdpm-1", 4)
    assert (e.code, e.details) == (grpc.StatusCode.UNAVAILABLE, "the replica went away")
    assert "resume_job='job-7f3a'" in str(e) and "finetune_weights" in str(e)
    assert len(fake.calls) == 1  # a bidi stream is never retried


def test_the_job_event_is_an_event_and_names_the_job_on_the_call(sdk, fake):
    fake.script("FinetuneWeights", [JOB, PROGRESS, result_event("FinetuneWeights")])
    seen, call = sdk.stream("finetune_weights", LOSS, EXAMPLES, iterations=3)
    assert [e.WhichOneof("kind") for e, _ in seen] == ["job", "progress", "result"]
    assert call.job_id == "job-7f3a"
    assert call.job == adjointdpm.JobInfo("job-7f3a", "adjointdpm-1", 4)
    heard = []
    sdk.call("finetune_weights", LOSS, EXAMPLES, iterations=3, on_event=heard.append)
    assert heard[0] == JOB.response("FinetuneWeights")


def test_without_a_job_event_a_lost_stream_is_a_plain_error(sdk, fake):
    fake.script("FinetuneWeights", [PROGRESS, LOST])
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        _finetune(sdk)
    assert type(err.value) is adjointdpm.AdjointDPMError
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("code", [grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN])
def test_a_stream_cut_by_the_server_is_interrupted_too(sdk, fake, code):
    fake.script("FinetuneWeights", [JOB, Abort(code, "drained")])
    with pytest.raises(adjointdpm.JobInterrupted) as err:
        _finetune(sdk)
    assert err.value.code == code and err.value.job_id == "job-7f3a"


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL])
def test_a_refusal_or_failure_is_not_an_interruption(sdk, fake, code):
    fake.script("FinetuneWeights", [JOB, Abort(code, "no")])
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        _finetune(sdk)
    assert type(err.value) is adjointdpm.AdjointDPMError and err.value.code == code


def test_resume_job_from_the_error_reaches_the_server(sdk, fake):
    fake.script("FinetuneWeights", [JOB, LOST])
    with pytest.raises(adjointdpm.JobInterrupted) as err:
        _finetune(sdk)
    fake.reset()
    _finetune(sdk, resume_job=err.value.job_id)
    assert fake.only("FinetuneWeights").request.resume_job == "job-7f3a"


def test_a_client_that_cancels_gets_no_job_interrupted(fake, fake_server):
    fake.script("FinetuneWeights", [JOB, Hold()])
    with adjointdpm.Client(fake_server.target) as c:
        call = c.finetune_weights(LOSS, EXAMPLES, iterations=3, stream=True)
        events = iter(call)
        assert next(events) == JOB.response("FinetuneWeights")
        call.cancel()
        with pytest.raises(adjointdpm.AdjointDPMError) as err:
            next(events)
    assert type(err.value) is adjointdpm.AdjointDPMError
    assert err.value.code == grpc.StatusCode.CANCELLED


def test_a_server_that_dies_mid_fine_tune_sync():
    """A real transport loss: the fake server is stopped while the job runs."""
    server = FakeServer()
    server.servicer.script("FinetuneWeights", [JOB, PROGRESS, Hold()])
    try:
        with adjointdpm.Client(server.target) as c:
            call = c.finetune_weights(LOSS, EXAMPLES, iterations=3, stream=True)
            kinds = []
            with pytest.raises(adjointdpm.JobInterrupted) as err:
                for event in call:
                    kinds.append(event.WhichOneof("kind"))
                    if kinds == ["job", "progress"]:
                        threading.Thread(target=server.stop).start()
        assert err.value.job_id == "job-7f3a" and call.job_id == "job-7f3a"
        assert err.value.code.name in ("UNAVAILABLE", "CANCELLED", "UNKNOWN")
    finally:
        server.stop()


def test_a_server_that_dies_mid_fine_tune_aio():
    server = FakeServer()
    server.servicer.script("FinetuneWeights", [JOB, PROGRESS, Hold()])

    async def main():
        async with adjointdpm.aio.Client(server.target) as c:
            call = c.finetune_weights(LOSS, EXAMPLES, iterations=3, stream=True)
            with pytest.raises(adjointdpm.JobInterrupted) as err:
                async for event in call:
                    if event.WhichOneof("kind") == "progress":
                        await asyncio.to_thread(server.stop)
            return err.value, call

    try:
        err, call = asyncio.run(main())
        assert err.job_id == "job-7f3a" and call.job.replica == "adjointdpm-1"
        assert err.code.name in ("UNAVAILABLE", "CANCELLED", "UNKNOWN")
    finally:
        server.stop()
