"""Artifacts in diffusers' formats: after FinetuneWeights (LoRA) and OptimizeEmbedding (a token)
through the service on a tiny Stable Diffusion, a stock diffusers pipeline built from the same
directory loads the exported files with its own loaders (``load_lora_weights``,
``load_textual_inversion``) and, with the same scheduler, timesteps and noise, reproduces the
service's Sample in float32. No project code runs on the loading side.

The service's Euler on the t-uniform grid 999, 888, …, 111, 0 is Euler in ρ = σ, which is diffusers'
EulerDiscreteScheduler on the same timesteps when its last step ends at σ(t=0)
(``final_sigmas_type="sigma_min"``); its latents are in σ-units, ours are x = α·y.
For digits, the adapter is a peft state of a diffusers ``UNet2DModel`` under ``unet.`` — checked by
``peft.set_peft_model_state_dict`` on a stock model."""

import json

import numpy as np
import pytest
import torch

import adjointdpm
from adjointdpm_server.config import Limits, ServerConfig
from adjointdpm_server.wire import build_server
from tests.models.tiny_sd import build_tiny_sd

PROMPT = "a photo of <*>"
TIMESTEPS = [999 - 111 * k for k in range(9)] + [0]
GUIDANCE = 2.0


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    sd_path = build_tiny_sd(root / "sd")
    srv = build_server(ServerConfig(models=(f"tiny=diffusers:{sd_path}", "digits"), port=0,
                                    artifact_dir=root / "artifacts", limits=Limits(max_batch=4, max_steps=50)))
    with adjointdpm.Client(f"127.0.0.1:{srv.port}", timeout=300) as client:
        yield client, sd_path, root
    srv.stop(0)


def _stock_pipeline(sd_path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_path, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, final_sigmas_type="sigma_min")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stock_latents(pipe, prompt, x_T):
    with torch.no_grad():
        out = pipe(prompt=prompt, timesteps=TIMESTEPS, guidance_scale=GUIDANCE, output_type="latent",
                   latents=torch.from_numpy(x_T)).images
    alpha_0 = float(pipe.scheduler.alphas_cumprod[0]) ** 0.5
    return out.numpy() * alpha_0  # σ-units (y) → x = α·y at t = 0


def _service(client, prompt, x_T, **kw):
    return client.sample(model="tiny", prompt=prompt, x_T=x_T, steps=9, grid="time", solver="euler",
                         guidance_scale=GUIDANCE, **kw).x0


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_lora_adapter_loads_in_a_stock_pipeline(sd, tmp_path):
    client, sd_path, _ = sd
    style = np.random.default_rng(1).uniform(size=(3, 16, 16)).astype(np.float32)
    tuned = client.finetune_weights(adjointdpm.ServerLoss("mse", tensors={"target": style}),
                                    [{"seed": 0, "prompt": "a cat"}], model="tiny", lora_rank=2,
                                    lora_alpha=4.0, iterations=3, lr=5e-2, steps=3, guidance_scale=GUIDANCE)
    info, data = client.download_artifact(tuned.artifact.id, tmp_path / "lora.safetensors", format="diffusers")
    assert info.size == len(data) > 0
    x_T = np.random.default_rng(2).normal(size=(1, 4, 8, 8)).astype(np.float32)
    base_ours = _service(client, "a cat", x_T)
    ours = _service(client, "a cat", x_T, adapter=tuned.artifact.id)

    pipe = _stock_pipeline(sd_path)
    base = _stock_latents(pipe, "a cat", x_T)
    pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    theirs = _stock_latents(pipe, "a cat", x_T)
    assert _rel(base_ours, base) < 1e-5           # the same sampler on both sides
    assert _rel(ours, theirs) < 1e-5              # and the same adapter, rank 2, alpha 4
    assert _rel(ours, base_ours) > 1e-3           # which changes the sample


def test_learned_token_loads_in_a_stock_pipeline(sd, tmp_path):
    client, sd_path, _ = sd
    target = np.zeros((3, 16, 16), np.float32)
    target[2] = 1.0
    inv = client.optimize_embedding(model="tiny", target_image=target, token={"initializer": "cat"},
                                    prompt=PROMPT, iterations=3, lr=0.1, seed=0, steps=3, guidance_scale=GUIDANCE)
    client.download_artifact(inv.artifact.id, tmp_path / "token.safetensors", format="diffusers")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "token.safetensors"), "pt") as f:
        assert list(f.keys()) == ["<*>"]  # the token string travels with the vector
    x_T = np.random.default_rng(3).normal(size=(1, 4, 8, 8)).astype(np.float32)
    ours = _service(client, PROMPT, x_T, embedding=inv.artifact.id)
    pipe = _stock_pipeline(sd_path)
    pipe.load_textual_inversion(str(tmp_path / "token.safetensors"))
    assert _rel(ours, _stock_latents(pipe, PROMPT, x_T)) < 1e-5


def test_formats_that_do_not_apply_are_refused(sd):
    client, _, _ = sd
    loss = adjointdpm.ServerLoss("classifier", {"label": 3})
    tuned = client.finetune_weights(loss, [{"seed": 0, "label": 1}], model="digits", lora_rank=2,
                                    iterations=1, steps=3)
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        client.download_artifact(tuned.artifact.id, format="diffusers")
    assert err.value.code.name == "FAILED_PRECONDITION"
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        client.download_artifact(tuned.artifact.id, format="comfy")
    assert err.value.code.name == "INVALID_ARGUMENT"


def test_digits_adapter_is_a_peft_state_of_a_stock_unet2dmodel(sd, tmp_path):
    """docs: a digits LoRA artifact holds peft's state of the diffusers UNet2DModel, keys prefixed
    `unet.` (the wrapper's attribute) with peft's adapter name; its metadata gives rank, alpha, targets."""
    from diffusers import UNet2DModel
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import safe_open

    from adjointdpm_server.models._digits import DIGITS_WEIGHTS

    client, _, _ = sd
    tuned = client.finetune_weights(adjointdpm.ServerLoss("classifier", {"label": 3}), [{"seed": 0, "label": 1}],
                                    model="digits", lora_rank=2, iterations=2, lr=0.05, steps=3)
    _, data = client.download_artifact(tuned.artifact.id, tmp_path / "digits.safetensors")
    with safe_open(str(tmp_path / "digits.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["adjointdpm"])["metadata"]
        state = {k[len("unet."):]: f.get_tensor(k) for k in f.keys()}
    unet = UNet2DModel.from_pretrained(DIGITS_WEIGHTS / "unet", local_files_only=True)
    config = LoraConfig(r=meta["rank"], lora_alpha=meta["alpha"] or meta["rank"], target_modules=meta["targets"])
    unet = inject_adapter_in_model(config, unet)
    result = set_peft_model_state_dict(unet, {k.replace(".default", ""): v for k, v in state.items()})
    assert not result.unexpected_keys
    loaded = dict(unet.named_parameters())
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert any(float(v.abs().max()) > 0 for k, v in state.items() if "lora_B" in k)


def test_the_readme_export_snippet_runs(sd, tmp_path, monkeypatch):
    import re
    from pathlib import Path

    client, sd_path, _ = sd
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = re.search(r"<!-- export-snippet[^>]*-->\n```python\n(.*?)```", text, re.S).group(1)
    tuned = client.finetune_weights(adjointdpm.ServerLoss("mse", tensors={"target": np.zeros((3, 16, 16), np.float32)}),
                                    [{"seed": 0, "prompt": "a cat"}], model="tiny", lora_rank=2, iterations=1,
                                    steps=3)
    inv = client.optimize_embedding(model="tiny", target_image=np.ones((3, 16, 16), np.float32),
                                    prompt=PROMPT, iterations=1, steps=3)
    pipe = _stock_pipeline(sd_path)
    monkeypatch.chdir(tmp_path)
    exec(code, {"client": client, "adapter_id": tuned.artifact.id, "token_id": inv.artifact.id, "pipe": pipe})
    assert "<*>" in pipe.tokenizer.get_vocab() and pipe.get_active_adapters()
