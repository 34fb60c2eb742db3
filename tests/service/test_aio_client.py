"""``adjointdpm.aio.Client`` against a real server: concurrent coroutines (a client loss that
awaits among them) give the synchronous client's results; streaming as an async iterator;
cancelling the awaiting task frees the server's job; errors are the same ``AdjointDPMError``."""

import asyncio
import time

import grpc
import numpy as np
import pytest

import adjointdpm
import adjointdpm.aio

TARGET = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(1, 1, 8, 8)


def _mse_numpy(image):
    diff = image - TARGET
    return float(np.sum(diff ** 2)), 2 * diff


async def _mse_awaiting(image):  # autograd: a torch tensor in, a scalar tensor out, after an await
    await asyncio.sleep(0.01)
    return ((image - float(TARGET.mean())) ** 2).sum()


def _close(a, b, rtol=1e-4):
    return np.linalg.norm(np.asarray(a) - b) <= rtol * max(np.linalg.norm(b), 1e-12)


def test_concurrent_coroutines_equal_the_sync_client(server, client):
    sync_sample = client.sample(labels=[3, 5], seed=0, steps=6)
    sync_numpy = client.compute_gradient(adjointdpm.ClientLoss(_mse_numpy, autograd=False),
                                         targets=["x_T", "cond"], labels=4, seed=1, steps=5)
    sync_async_loss = client.compute_gradient(adjointdpm.ClientLoss(
        lambda img: ((img - float(TARGET.mean())) ** 2).sum(), name="mse_mean"), labels=2, seed=2, steps=5)

    async def main():
        async with adjointdpm.aio.Client(f"127.0.0.1:{server.port}", timeout=120) as aclient:
            return await asyncio.gather(
                aclient.sample(labels=[3, 5], seed=0, steps=6),
                aclient.compute_gradient(adjointdpm.ClientLoss(_mse_numpy, autograd=False),
                                         targets=["x_T", "cond"], labels=4, seed=1, steps=5),
                aclient.compute_gradient(_mse_awaiting, labels=2, seed=2, steps=5),
                aclient.list_models())

    got_sample, got_numpy, got_async, models = asyncio.run(main())
    assert isinstance(got_sample, adjointdpm.SampleResult) and isinstance(got_numpy, adjointdpm.GradientResult)
    assert _close(got_sample.x0, sync_sample.x0)
    for key in ("x_T", "cond"):
        assert _close(got_numpy.gradients[key], sync_numpy.gradients[key])
    assert _close(got_async.gradients["x_T"], sync_async_loss.gradients["x_T"])
    assert got_async.loss == pytest.approx(sync_async_loss.loss, rel=1e-4)
    assert {m["name"] for m in models} == {m["name"] for m in client.list_models()}


def test_streaming_is_an_async_iterator(server):
    async def main():
        async with adjointdpm.aio.Client(f"127.0.0.1:{server.port}") as aclient:
            call = aclient.sample(labels=1, seed=0, steps=4, stream=True)
            kinds = [event.WhichOneof("kind") async for event in call]
            return kinds, call.result

    kinds, result = asyncio.run(main())
    assert kinds.count("progress") == 4 and kinds[-1] == "result"
    assert result.x0.shape == (1, 1, 8, 8)


def test_cancelling_the_task_frees_the_servers_job(server):
    started = []

    async def never_answers(image):
        started.append(time.monotonic())
        await asyncio.Event().wait()  # a client that never replies

    async def main():
        async with adjointdpm.aio.Client(f"127.0.0.1:{server.port}") as aclient:
            task = asyncio.ensure_future(aclient.compute_gradient(never_answers, labels=1, seed=0, steps=4))
            while not started:
                await asyncio.sleep(0.02)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    deadline = time.monotonic() + 20
    while not server.service.idle and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.service.idle


def test_errors_are_adjointdpm_errors(server):
    async def main():
        async with adjointdpm.aio.Client(f"127.0.0.1:{server.port}") as aclient:
            with pytest.raises(adjointdpm.AdjointDPMError) as err:
                await aclient.sample(model="no-such-model")
            return err.value.code

    assert asyncio.run(main()) == grpc.StatusCode.NOT_FOUND


def test_download_artifact_equals_the_sync_clients(server, client, tmp_path):
    rng = np.random.default_rng(0)
    result = client.compute_gradient(adjointdpm.ServerLoss("mse", tensors={"target": TARGET[0]}),
                                     targets=["weights"], model="gaussian-mixture",
                                     x_T=rng.normal(size=(2, 1, 8, 8)).astype(np.float32),
                                     cond=np.zeros((2, 1, 8, 8), np.float32), steps=3,
                                     weights={"parameters": ["means"]})
    artifact = result.weights_artifact.id
    info, data = client.download_artifact(artifact)

    async def main():
        async with adjointdpm.aio.Client(f"127.0.0.1:{server.port}") as aclient:
            return await aclient.download_artifact(artifact, tmp_path / "g.safetensors")

    ainfo, adata = asyncio.run(main())
    assert adata == data and len(data) > 0 and (tmp_path / "g.safetensors").read_bytes() == data
    assert ainfo == info
