"""SDXL, SD3-type and FLUX-type models end to end over a loopback server (tiny pipelines built from
config, tests/models/tiny_families.py): ListModels says what each is; Sample, ComputeGradient
(x_T, the packed cond, a token through every encoder, LoRA weights), FinetuneWeights (LoRA) and
OptimizeEmbedding (a token) run through the existing RPCs and give what the core gives in-process
on the same resident models; FLUX's guidance travels as a network input."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

import adjointdpm
from adjointdpm_server.core import sample
from adjointdpm_server.models._adapters import with_lora
from tests.models.contract import cfg_scale, declared
from tests.models.tiny_families import build_tiny_flux, build_tiny_sd3, build_tiny_sdxl

from .conftest import serve

FAMILIES = ("sdxl", "sd3", "flux")
T5_LENGTH = 24
PROMPT = "a photo of a cat"
TARGET = np.linspace(0, 1, 3 * 16 * 16, dtype=np.float32).reshape(3, 16, 16)
MSE = adjointdpm.ServerLoss("mse", tensors={"target": TARGET})
STEPS, SCALE = 3, 2.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):  # overrides conftest's: this module serves the three families
    root = tmp_path_factory.mktemp("families")
    sdxl, sd3, flux = build_tiny_sdxl(root / "sdxl"), build_tiny_sd3(root / "sd3"), build_tiny_flux(root / "flux")
    srv = serve(tmp_path_factory, models=(f"sdxl=diffusers:{sdxl}",
                                          f"sd3=diffusers:{sd3}?max_sequence_length={T5_LENGTH}",
                                          f"flux=diffusers:{flux}?height=16&width=16&max_sequence_length={T5_LENGTH}"))
    yield srv
    srv.stop(0)


def _digest(module) -> str:
    return hashlib.sha256(b"".join(t.numpy().tobytes() for t in module.state_dict().values())).hexdigest()


def _close(got, want, tol=1e-4):
    want = want.detach().numpy()
    assert np.linalg.norm(got - want) <= tol * np.linalg.norm(want)


def _per_sample_loss(backend, x0):
    return (backend.decode(x0) - torch.from_numpy(TARGET)).square().flatten(1).mean(1)


def _sample(backend, eps_fn, x_T, c, **kw):
    return sample(eps_fn, x_T, c.cond, uncond=c.uncond, guidance_scale=cfg_scale(backend, SCALE),
                  schedule=backend.schedule, steps=STEPS, **declared(backend), **kw)


def test_list_models_says_what_each_family_is(client, rt):
    info = {m["name"]: m for m in client.list_models()}
    for name in FAMILIES:
        b = rt.models[name]
        m = info[name]
        assert (m["family"], m["guidance"], m["prediction"]) == (name, b.guidance, b.prediction)
        assert m["cond_shape"] == list(b.cond_shape) and m["token_dim"] == b.token_dim > 0
        assert m["conditioning"] == "prompt" and m["latent_shape"] == [4, 8, 8]
    assert info["flux"]["guidance"] == "embedded" and info["flux"]["default_guidance"] == 3.5
    assert info["sd3"]["path"] == "rectified_flow" and info["sdxl"]["path"] == "vp"


@pytest.mark.parametrize("name", FAMILIES)
def test_sample_and_gradients_equal_in_process(client, rt, name):
    b = rt.models[name]
    result = client.compute_gradient(MSE, targets=["x_T", "cond"], model=name, prompt=[PROMPT, "a dog"],
                                     seed=4, steps=STEPS, guidance_scale=SCALE, images=False)
    c = b.guide(b.encode(2, prompt=[PROMPT, "a dog"]), SCALE)
    x_T = b.noise(2, seed=4).requires_grad_()
    cond = c.cond.detach().clone().requires_grad_()
    per_sample = _per_sample_loss(b, _sample(b, b.eps_fn, x_T, type(c)(cond, c.uncond)))
    gx, gc = torch.autograd.grad(per_sample.sum(), [x_T, cond])
    assert result.loss == pytest.approx(float(per_sample.sum().detach()), rel=1e-5)
    _close(result.gradients["x_T"], gx)
    _close(result.gradients["cond"], gc)
    assert result.gradients["cond"].shape == (2, *b.cond_shape)
    plain = client.sample(model=name, prompt=[PROMPT, "a dog"], seed=4, steps=STEPS, guidance_scale=SCALE,
                          images=False)
    with torch.no_grad():
        x0 = _sample(b, b.eps_fn, b.noise(2, seed=4), c, grad_mode="none")
    np.testing.assert_allclose(plain.x0, x0.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_token_and_lora_gradients_equal_in_process(client, rt, name):
    b = rt.models[name]
    start = b.random_token(seed=5)
    result = client.compute_gradient(MSE, targets=["token", "weights"], model=name, prompt="a photo of <*>",
                                     seed=1, steps=STEPS, guidance_scale=SCALE, images=False,
                                     token={"embedding": start.numpy()}, weights={"lora_rank": 2, "inline": True})
    leaf = start.clone().requires_grad_()
    lora = with_lora(b.eps_fn, 2, targets=b.lora_targets)  # the service's own (seeded) start
    params = {n: p for n, p in lora.named_parameters() if p.requires_grad}
    c = b.guide(b.encode_with_token(1, "a photo of <*>", leaf), SCALE)
    loss = _per_sample_loss(b, _sample(b, lora, b.noise(1, seed=1), c)).sum()
    grads = torch.autograd.grad(loss, [leaf, *params.values()])
    _close(result.gradients["token"], grads[0])
    lora_b = [(n, g) for n, g in zip(params, grads[1:]) if "lora_B" in n]
    assert lora_b and all(float(g.abs().max()) > 0 for _, g in lora_b)  # B = 0 at the start: B moves first
    got = np.concatenate([result.weight_gradients[n].ravel() for n, _ in lora_b])
    _close(got, torch.cat([g.flatten() for _, g in lora_b]))


@pytest.mark.parametrize("name", FAMILIES)
def test_finetune_lora_and_learn_a_token(client, rt, name):
    b = rt.models[name]
    resident = _digest(b.eps_fn)
    tuned = client.finetune_weights(MSE, [{"seed": 0, "prompt": PROMPT}, {"seed": 1, "prompt": "a dog"}],
                                    model=name, lora_rank=2, iterations=3, lr=5e-2, steps=STEPS,
                                    guidance_scale=SCALE)
    assert tuned.artifact.kind == "lora" and tuned.history[-1] < tuned.history[0]
    base = client.sample(model=name, prompt=PROMPT, seed=0, steps=STEPS, guidance_scale=SCALE, images=False)
    styled = client.sample(model=name, prompt=PROMPT, seed=0, steps=STEPS, guidance_scale=SCALE, images=False,
                           adapter=tuned.artifact.id)
    assert np.abs(styled.x0 - base.x0).max() > 1e-4

    inv = client.optimize_embedding(target_image=TARGET, token={"initializer": "cat"}, model=name,
                                    prompt="a photo of <*>", iterations=3, lr=0.05, seed=0, steps=STEPS,
                                    guidance_scale=SCALE)
    assert inv.artifact.kind == "embedding" and inv.history[-1] < inv.history[0]
    used = client.sample(model=name, embedding=inv.artifact.id, prompt="a photo of <*>", seed=0, steps=STEPS,
                         guidance_scale=SCALE, images=False)
    tensors, _ = rt.artifacts.load(inv.artifact.id)
    assert tensors["token"].shape == (b.token_dim,)
    c = b.guide(b.encode_with_token(1, "a photo of <*>", tensors["token"]), SCALE)
    with torch.no_grad():
        x0 = _sample(b, b.eps_fn, b.noise(1, seed=0), c, grad_mode="none")
    np.testing.assert_allclose(used.x0, x0.numpy(), rtol=0, atol=1e-5)
    assert _digest(b.eps_fn) == resident


def test_flux_guidance_is_a_network_input_not_cfg(client, rt):
    low = client.sample(model="flux", prompt=PROMPT, seed=0, steps=STEPS, guidance_scale=1.0, images=False)
    default = client.sample(model="flux", prompt=PROMPT, seed=0, steps=STEPS, images=False)
    high = client.sample(model="flux", prompt=PROMPT, seed=0, steps=STEPS, guidance_scale=3.5, images=False)
    np.testing.assert_array_equal(default.x0, high.x0)  # the default is 3.5
    assert np.abs(low.x0 - high.x0).max() > 1e-4  # 1.0 is an input too, not "CFG off"
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        client.sample(model="flux", prompt=PROMPT, negative_prompt="a dog", seed=0, steps=STEPS)
    assert err.value.code.name == "INVALID_ARGUMENT" and "negative prompt" in str(err.value)
