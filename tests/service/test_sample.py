"""Sample over the wire equals sampling in-process with the same resident model."""

import io

import numpy as np
import torch
from PIL import Image

from adjointdpm_server.core import sample


def test_sample_equals_in_process(client, rt):
    events = []
    result = client.sample(labels=[0, 1, 2, 7], seed=3, steps=8, pixels=True, on_event=events.append)
    backend = rt.models["digits"]
    c = backend.encode(4, labels=[0, 1, 2, 7])
    with torch.no_grad():
        x_T = backend.noise(4, seed=3)
        x0 = sample(backend.eps_fn, x_T, c.cond, schedule=backend.schedule, grid=backend.default_grid, steps=8,
                    guidance_scale=backend.default_guidance, uncond=c.uncond, grad_mode="none")
    assert np.array_equal(result.x_T, x_T.numpy())
    np.testing.assert_allclose(result.x0, x0.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(result.pixels, backend.decode(x0).numpy(), atol=1e-6)
    steps = [e.progress.step for e in events if e.WhichOneof("kind") == "progress"]
    assert steps == list(range(1, 9))
    assert len(result.images) == 4
    for png, pixels in zip(result.images, result.pixels):
        img = np.asarray(Image.open(io.BytesIO(png)))
        assert img.shape == (8, 8)
        assert np.abs(img / 255.0 - pixels[0]).max() <= 0.5 / 255 + 1e-6


def test_given_x_T_solver_and_intermediate_start(client, rt):
    backend = rt.models["gaussian-mixture"]
    x_T = np.random.default_rng(0).normal(size=(3, 1, 8, 8)).astype(np.float32)
    cond = np.zeros((1, 8, 8), np.float32)
    result = client.sample(model="gaussian-mixture", x_T=x_T, cond=cond, steps=12, solver="ab3",
                           grid="time", t_start=0.5, images=False)
    with torch.no_grad():
        x0 = sample(backend.eps_fn, torch.from_numpy(x_T), torch.zeros(3, 1, 8, 8),
                    schedule=backend.schedule, steps=12, solver="ab3", grid="time", t_start=0.5,
                    grad_mode="none")
    assert result.images == []
    np.testing.assert_allclose(result.x0, x0.numpy(), atol=1e-6)


def test_streamed_events_then_result(client):
    call = client.sample(labels=5, batch=2, seed=0, steps=4, stream=True)
    kinds = [e.WhichOneof("kind") for e in call]
    assert kinds == ["progress"] * 4 + ["result"]
    assert call.result.x0.shape == (2, 1, 8, 8)
