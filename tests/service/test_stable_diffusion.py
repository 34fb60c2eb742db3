"""The service on a tiny Stable Diffusion built from config: prompts, a token target, textual
inversion used by Sample, LoRA stylization with VAE features, and a local CLIP loss."""

import hashlib

import numpy as np
import pytest
import torch

import adjointdpm
from adjointdpm_server.config import Limits, ServerConfig
from adjointdpm_server.core import sample
from adjointdpm_server.losses import LossContext, build_loss
from adjointdpm_server.wire import build_server
from tests.models.tiny_sd import HIDDEN, build_tiny_clip, build_tiny_sd

PROMPT = "a photo of <*>"


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    sd_path = build_tiny_sd(root / "sd")
    clip = build_tiny_clip(root / "clip", sd_path)
    config = ServerConfig(models=(f"tiny=diffusers:{sd_path}",), port=0, artifact_dir=root / "artifacts",
                          clip_model_dir=clip, limits=Limits(max_batch=4, max_steps=50))
    srv = build_server(config)
    with adjointdpm.Client(f"127.0.0.1:{srv.port}", timeout=300) as client:
        yield client, srv.runtime.models["tiny"], srv.runtime
    srv.stop(0)


def _digest(module):
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode() + t.detach().numpy().tobytes())
    return h.hexdigest()


def test_prompt_sampling_equals_in_process(sd):
    client, backend, _ = sd
    result = client.sample(prompt=["a cat", "a dog"], seed=0, steps=4, guidance_scale=3.0)
    c = backend.encode(2, prompt=["a cat", "a dog"])
    with torch.no_grad():
        x0 = sample(backend.eps_fn, backend.noise(2, seed=0), c.cond, schedule=backend.schedule,
                    steps=4, guidance_scale=3.0, uncond=c.uncond, grad_mode="none")
    np.testing.assert_allclose(result.x0, x0.numpy(), atol=1e-5)
    assert len(result.images) == 2


def test_token_gradient_equals_in_process(sd):
    client, backend, _ = sd
    start = np.random.default_rng(0).normal(size=HIDDEN).astype(np.float32) * 0.02
    target = np.full((3, 16, 16), 0.5, np.float32)
    loss = adjointdpm.ServerLoss("mse", tensors={"target": target})
    got = client.compute_gradient(loss, targets=["token"], prompt=PROMPT, seed=0, steps=3,
                                  guidance_scale=2.0, token={"embedding": start})
    leaf = torch.from_numpy(start).requires_grad_()
    c = backend.encode_with_token(1, PROMPT, leaf)
    x0 = sample(backend.eps_fn, backend.noise(1, seed=0), c.cond, schedule=backend.schedule, steps=3,
                guidance_scale=2.0, uncond=c.uncond)
    ref = (backend.decode(x0) - torch.from_numpy(target)).square().flatten(1).mean(1).mean()
    (g,) = torch.autograd.grad(ref, leaf)
    assert got.loss == pytest.approx(float(ref.detach()), rel=1e-5)
    assert np.linalg.norm(got.gradients["token"] - g.numpy()) <= 1e-4 * g.norm().item()


def test_textual_inversion_then_sample_with_the_embedding(sd):
    client, backend, rt = sd
    target = np.zeros((3, 16, 16), np.float32)
    target[0] = 1.0  # red
    inv = client.optimize_embedding(target_image=target, token={"initializer": "cat"}, prompt=PROMPT,
                                    iterations=3, lr=0.05, seed=0, steps=3, guidance_scale=2.0)
    assert inv.artifact.kind == "embedding" and inv.history[-1] < inv.history[0]
    used = client.sample(embedding=inv.artifact.id, prompt=PROMPT, seed=0, steps=3, guidance_scale=2.0)
    tensors, _ = rt.artifacts.load(inv.artifact.id)
    c = backend.encode_with_token(1, PROMPT, tensors["token"])
    with torch.no_grad():
        x0 = sample(backend.eps_fn, backend.noise(1, seed=0), c.cond, schedule=backend.schedule, steps=3,
                    guidance_scale=2.0, uncond=c.uncond, grad_mode="none")
    np.testing.assert_allclose(used.x0, x0.numpy(), atol=1e-5)


def test_lora_stylization_with_vae_features(sd):
    client, backend, _ = sd
    before = _digest(backend.unet)
    style = np.random.default_rng(1).uniform(size=(3, 16, 16)).astype(np.float32)
    loss = adjointdpm.ServerLoss("gram_style", {"content_weight": 0.1}, {"style": style})
    tuned = client.finetune_weights(loss, [{"seed": 0, "prompt": "a cat"}, {"seed": 1, "prompt": "a dog"}],
                                    lora_rank=2, iterations=3, lr=1e-2, steps=3, guidance_scale=2.0)
    assert tuned.artifact.kind == "lora" and tuned.history[-1] < tuned.history[0]
    assert _digest(backend.unet) == before
    base = client.sample(prompt="a cat", seed=0, steps=3, guidance_scale=2.0)
    styled = client.sample(prompt="a cat", seed=0, steps=3, guidance_scale=2.0, adapter=tuned.artifact.id)
    assert np.abs(styled.x0 - base.x0).max() > 1e-4


def test_clip_similarity_over_the_wire(sd):
    client, backend, rt = sd
    assert "clip_similarity" in {entry["name"] for entry in client.list_losses()}
    loss = adjointdpm.ServerLoss("clip_similarity", {"text": "a photo of a cat"})
    got = client.compute_gradient(loss, prompt="a cat", seed=0, steps=3, guidance_scale=2.0)
    plugin = build_loss("clip_similarity", LossContext(backend, rt.settings), {"text": "a photo of a cat"})
    c = backend.encode(1, prompt="a cat")
    x = backend.noise(1, seed=0).requires_grad_()
    x0 = sample(backend.eps_fn, x, c.cond, schedule=backend.schedule, steps=3, guidance_scale=2.0,
                uncond=c.uncond)
    value = plugin(backend.decode(x0))
    (g,) = torch.autograd.grad(value, x)
    assert 0.0 <= got.loss <= 2.0 and got.loss == pytest.approx(float(value.detach()), rel=1e-5)
    assert np.linalg.norm(got.gradients["x_T"] - g.numpy()) <= 1e-4 * g.norm().item()
    assert g.norm() > 0
