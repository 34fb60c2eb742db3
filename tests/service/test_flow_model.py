"""A flow-matching model (``digits-flow``: rectified flow, velocity) end to end over a loopback
server: Sample, ComputeGradient (x_T, cond), OptimizeEmbedding and FinetuneWeights (LoRA) give
what the core gives in-process on the same resident model, with the backend's declared
``prediction`` and ``default_grid`` (the client names neither)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

import adjointdpm
from adjointdpm_server.core import FlowSchedule, sample

from .conftest import serve

TO_EIGHT = adjointdpm.ServerLoss("classifier", params={"label": 8})


@pytest.fixture(scope="module")
def server(tmp_path_factory):  # overrides conftest's: this module's server has only digits-flow
    srv = serve(tmp_path_factory, models=("digits-flow",))
    yield srv
    srv.stop(0)


@pytest.fixture(scope="module")
def backend(server):
    return server.runtime.models["digits-flow"]


def _in_process(backend, labels, seed, steps, **kw):
    c = backend.encode(len(labels), labels=labels)
    return sample(backend.eps_fn, backend.noise(len(labels), seed=seed), c.cond, schedule=backend.schedule,
                  steps=steps, guidance_scale=backend.default_guidance, uncond=c.uncond,
                  prediction="velocity", grid="time", **kw)


def test_the_model_declares_a_flow_path_and_velocity(client, backend):
    assert isinstance(backend.schedule, FlowSchedule) and backend.prediction == "velocity"
    assert backend.schedule.t_min == 0.0 and backend.default_grid == "time"
    (info,) = client.list_models()  # and says so to clients
    assert (info["path"], info["prediction"], info["default_grid"]) == ("rectified_flow", "velocity", "time")
    assert (info["t_min"], info["t_max"]) == (0.0, 0.999) and info["schedule"].startswith("FlowSchedule.rectified(")


def test_sample_equals_in_process(client, backend):
    result = client.sample(model="digits-flow", labels=[0, 3, 8], seed=2, steps=12, images=False)
    with torch.no_grad():
        x0 = _in_process(backend, [0, 3, 8], 2, 12, grad_mode="none")
    np.testing.assert_allclose(result.x0, x0.numpy(), rtol=0, atol=1e-6)
    # read as ε (the wrong target) the same network gives something else entirely
    with torch.no_grad():
        c = backend.encode(3, labels=[0, 3, 8])
        wrong = sample(backend.eps_fn, backend.noise(3, seed=2), c.cond, schedule=backend.schedule, steps=12,
                       guidance_scale=backend.default_guidance, uncond=c.uncond, grid="time", grad_mode="none")
    assert np.abs(result.x0 - wrong.numpy()).max() > 0.1


def test_compute_gradient_equals_in_process(client, backend):
    target = np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 8, 8)
    loss = adjointdpm.ServerLoss("mse", tensors={"target": target})
    result = client.compute_gradient(loss, targets=["x_T", "cond"], model="digits-flow", labels=[1, 7],
                                     seed=4, steps=8)
    c = backend.embed(backend.encode(2, labels=[1, 7]))
    x_T = backend.noise(2, seed=4).requires_grad_()
    cond = c.cond.detach().clone().requires_grad_()
    x0 = sample(backend.eps_fn, x_T, cond, schedule=backend.schedule, steps=8, prediction="velocity",
                grid="time", guidance_scale=backend.default_guidance, uncond=c.uncond)
    per_sample = (backend.decode(x0) - torch.from_numpy(target)).square().flatten(1).mean(1)
    gx, gc = torch.autograd.grad(per_sample.sum(), [x_T, cond])
    assert result.loss == pytest.approx(float(per_sample.sum().detach()), rel=1e-5)
    for got, want in ((result.gradients["x_T"], gx), (result.gradients["cond"], gc)):
        want = want.numpy()
        assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want)


def test_finetune_lora_on_the_flow_model(client, backend):
    h = hashlib.sha256(b"".join(t.numpy().tobytes() for t in backend.eps_fn.state_dict().values())).hexdigest()
    result = client.finetune_weights(TO_EIGHT, [{"seed": k, "label": k % 10} for k in range(3)], iterations=3,
                                     lr=5e-3, lora_rank=4, steps=5, model="digits-flow")
    assert result.artifact.kind == "lora" and result.history[-1] < result.history[0]
    tuned = client.sample(model="digits-flow", labels=[0, 1], seed=0, steps=5, images=False,
                          adapter=result.artifact.id)
    base = client.sample(model="digits-flow", labels=[0, 1], seed=0, steps=5, images=False)
    assert np.abs(tuned.x0 - base.x0).max() > 1e-3
    assert hashlib.sha256(b"".join(t.numpy().tobytes() for t in backend.eps_fn.state_dict().values())).hexdigest() == h


def test_optimize_embedding_on_the_flow_model(client):
    result = client.optimize_embedding([TO_EIGHT], iterations=4, lr=0.1, seed=0, batch=2, steps=5,
                                       model="digits-flow")
    assert result.artifact.kind == "embedding" and result.history[-1] < result.history[0]
    assert client.sample(model="digits-flow", embedding=result.artifact.id, seed=0, batch=2,
                         steps=5).x0.shape == (2, 1, 8, 8)


def test_a_logsnr_grid_is_refused_plainly(client):
    """The flow model's clean end (σ = 0) is out of a λ-uniform grid's reach: INVALID_ARGUMENT."""
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        client.sample(model="digits-flow", labels=1, seed=0, steps=5, grid="logsnr")
    assert err.value.code.name == "INVALID_ARGUMENT" and "logsnr" in str(err.value)
