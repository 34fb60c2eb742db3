"""ComputeGradient over the wire equals the same gradient computed in-process (torch autograd
through ``core.sample``) — with client-side losses (torch and numpy) and server-side plugins."""

import copy

import numpy as np
import pytest
import torch

import adjointdpm
from adjointdpm_server.core import sample


def _mixture_reference(rt, x_T, cond, target, steps, grad_mode="checkpoint", t_start=None):
    """In-process: loss = Σ over samples of mean((decode(x0) − target)²) (the objective sums
    per-sample losses, docs/design.md §4.3); also returns the per-sample losses."""
    backend = rt.models["gaussian-mixture"]
    x = torch.from_numpy(x_T).requires_grad_()
    c = torch.from_numpy(cond).requires_grad_()
    x0 = sample(backend.eps_fn, x, c, schedule=backend.schedule, grid=backend.default_grid, steps=steps, grad_mode=grad_mode,
                t_start=t_start)
    per_sample = (backend.decode(x0) - torch.from_numpy(target)).square().flatten(1).mean(1)
    gx, gc = torch.autograd.grad(per_sample.sum(), [x, c])
    return float(per_sample.sum().detach()), gx.numpy(), gc.numpy(), per_sample.detach().numpy()


@pytest.fixture
def problem():
    rng = np.random.default_rng(1)
    x_T = rng.normal(size=(2, 1, 8, 8)).astype(np.float32)
    cond = (0.1 * rng.normal(size=(2, 1, 8, 8))).astype(np.float32)
    target = rng.uniform(size=(1, 8, 8)).astype(np.float32)
    return x_T, cond, target


@pytest.mark.parametrize("kind", ["server", "client-torch", "client-numpy"])
def test_gradients_equal_in_process(client, rt, problem, kind):
    x_T, cond, target = problem
    if kind == "server":
        loss = adjointdpm.ServerLoss("mse", tensors={"target": target})
    elif kind == "client-torch":
        # one value per sample: the SDK sums them and sends them along
        loss = adjointdpm.ClientLoss(lambda img: (img - torch.from_numpy(target)).square().flatten(1)
                                     .mean(1), name="mse_torch")
    else:
        def mse_numpy(img):  # the batch's total only: each sample is credited total / B
            diff = img - target
            return float(np.sum(np.mean(diff.reshape(len(img), -1) ** 2, 1))), 2 * diff / diff[0].size
        loss = adjointdpm.ClientLoss(mse_numpy, autograd=False)
    result = client.compute_gradient(loss, targets=["x_T", "cond"], model="gaussian-mixture",
                                     x_T=x_T, cond=cond, steps=10)
    ref_loss, gx, gc, per_sample = _mixture_reference(rt, x_T, cond, target, 10)
    assert result.loss == pytest.approx(ref_loss, rel=1e-5)
    want = per_sample if kind != "client-numpy" else np.full(2, ref_loss / 2)
    np.testing.assert_allclose(result.sample_losses, want, rtol=1e-5)
    for got, want in ((result.gradients["x_T"], gx), (result.gradients["cond"], gc)):
        assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)
    assert result.nfe == 10  # grad_mode "" = auto: with room for every graph, no call is recomputed


def test_adjoint_mode_and_intermediate_state(client, rt, problem):
    x_T, cond, target = problem
    loss = adjointdpm.ServerLoss("mse", tensors={"target": target})
    result = client.compute_gradient(loss, targets=["x_t"], model="gaussian-mixture", x_T=x_T,
                                     cond=cond, steps=10, grad_mode="adjoint", t_start=0.4)
    _, gx, _, _ = _mixture_reference(rt, x_T, cond, target, 10, "adjoint", t_start=0.4)
    assert np.linalg.norm(result.gradients["x_T"] - gx) <= 1e-5 * np.linalg.norm(gx)


def test_weight_gradients_inline_and_as_artifact(client, rt, problem):
    x_T, cond, target = problem
    loss = adjointdpm.ServerLoss("mse", tensors={"target": target})
    inline = client.compute_gradient(loss, targets=["weights"], model="gaussian-mixture", x_T=x_T,
                                     cond=cond, steps=6, weights={"parameters": ["means"], "inline": True})
    backend = rt.models["gaussian-mixture"]
    model = copy.deepcopy(backend.eps_fn).requires_grad_(True)
    means = model.means
    x0 = sample(model, torch.from_numpy(x_T), torch.from_numpy(cond), schedule=backend.schedule, grid=backend.default_grid, steps=6)
    ref = torch.autograd.grad((backend.decode(x0) - torch.from_numpy(target)).square().flatten(1)
                              .mean(1).sum(), means)[0].numpy()
    assert set(inline.weight_gradients) == {"means"}
    assert np.linalg.norm(inline.weight_gradients["means"] - ref) <= 1e-5 * np.linalg.norm(ref)
    # by default weight gradients become a safetensors artifact, never megabytes of floats inline
    stored = client.compute_gradient(loss, targets=["weights"], model="gaussian-mixture", x_T=x_T,
                                     cond=cond, steps=6)
    assert stored.weight_gradients == {} and stored.weights_artifact.kind == "weight_gradients"
    from safetensors.numpy import load
    info, data = client.download_artifact(stored.weights_artifact.id)
    tensors = load(data)
    assert info.id == stored.weights_artifact.id and len(data) == info.size
    assert np.linalg.norm(tensors["means"] - ref) <= 1e-5 * np.linalg.norm(ref)
    assert not backend.eps_fn.means.requires_grad  # the resident model was not touched


def test_digits_cond_gradient_and_lora_gradients(client, rt):
    """Classifier loss on the digits model: ∂/∂x_T and ∂/∂(class embedding) match in-process."""
    loss = adjointdpm.ServerLoss("classifier", params={"label": 8})
    result = client.compute_gradient(loss, targets=["x_T", "cond"], labels=[3, 4], seed=0, steps=6)
    backend = rt.models["digits"]
    c = backend.embed(backend.encode(2, labels=[3, 4]))
    x = backend.noise(2, seed=0).requires_grad_()
    cond = c.cond.clone().requires_grad_()
    x0 = sample(backend.eps_fn, x, cond, schedule=backend.schedule, grid=backend.default_grid, steps=6,
                guidance_scale=backend.default_guidance, uncond=c.uncond)
    ref = torch.nn.functional.cross_entropy(backend.classify(backend.decode(x0)), torch.tensor([8, 8]),
                                            reduction="sum")
    gx, gc = torch.autograd.grad(ref, [x, cond])
    assert result.loss == pytest.approx(float(ref.detach()), rel=1e-5)
    assert np.linalg.norm(result.gradients["x_T"] - gx.numpy()) <= 1e-4 * gx.norm().item()
    assert np.linalg.norm(result.gradients["cond"] - gc.numpy()) <= 1e-4 * gc.norm().item()
    lora = client.compute_gradient(loss, targets=["weights"], labels=3, seed=0, steps=4,
                                   weights={"lora_rank": 2, "inline": True})
    assert lora.weight_gradients and all("lora_" in k for k in lora.weight_gradients)
    assert any(np.abs(g).max() > 0 for g in lora.weight_gradients.values())  # B=0: ∂/∂B ≠ 0
