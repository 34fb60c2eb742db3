"""SDXL, SD3-type and FLUX-type backends on tiny pipelines built from config (tiny_families.py),
loaded through ``load_model("diffusers:<dir>")`` — the family read from ``model_index.json``.

What is held: ``Sample`` equals the stock diffusers pipeline on the same scheduler and timesteps
(DDIM for SDXL, FlowMatchEuler for SD3/FLUX) in float64; ``checkpoint == backprop`` for x_T, the
packed prompt embeddings (every encoder's output), a learned token (through every encoder) and
LoRA weights; the shared backend contract; the packed-``cond`` layout; FLUX's guidance input.
Everything loads with the network cut off.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adjointdpm_server.core import FlowSchedule, VPSchedule, sample
from adjointdpm_server.models import load_model
from adjointdpm_server.models._adapters import with_lora
from adjointdpm_server.models._flux import pack_latents
from adjointdpm_server.models._packing import TokensAndVector

from .contract import BackendContract, cfg_scale, declared
from .test_stable_diffusion import _offline
from .tiny_families import (CLIP_2_HIDDEN, CLIP_HIDDEN, CLIP_MAX_LENGTH, SD3_POOLED_DIM, T5_HIDDEN,
                            build_tiny_flux, build_tiny_sd3, build_tiny_sdxl)

PROMPT = "a photo of a cat"
T5_LENGTH = 24  # T5 tokens the tests ask for (the pipelines' defaults, 256/512, work but cost more)
BUILDERS = {"sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3, "flux": build_tiny_flux}
OPTIONS = {"sdxl": "", "sd3": f"?max_sequence_length={T5_LENGTH}",
           "flux": f"?height=16&width=16&max_sequence_length={T5_LENGTH}"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp)
        root = tmp_path_factory.mktemp("families")
        return {name: build(root / name) for name, build in BUILDERS.items()}


def _load(dirs, family, dtype=torch.float64):
    with pytest.MonkeyPatch.context() as mp:
        attempts = _offline(mp)
        backend = load_model(f"diffusers:{dirs[family]}{OPTIONS[family]}", dtype=dtype)
    assert attempts == []
    return backend


@pytest.fixture(scope="module")
def backends(dirs):
    return {family: _load(dirs, family) for family in BUILDERS}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------- loading


def test_the_family_comes_from_model_index(backends):
    sdxl, sd3, flux = backends["sdxl"], backends["sd3"], backends["flux"]
    assert (sdxl.family, sd3.family, flux.family) == ("sdxl", "sd3", "flux")
    assert isinstance(sdxl.schedule, VPSchedule) and sdxl.prediction == "epsilon"
    for b in (sd3, flux):
        assert isinstance(b.schedule, FlowSchedule) and b.prediction == "velocity"
        assert b.default_grid == "time" and b.schedule.t_min == 0.0
    assert sd3.schedule.shift == 3.0
    # FLUX's dynamic shift: μ from 16 image tokens (calculate_shift), exponential time shift
    mu = 0.5 + (1.15 - 0.5) * (16 - 256) / (4096 - 256)
    assert flux.schedule.shift == pytest.approx(np.exp(mu), rel=1e-12)
    for b in backends.values():
        assert b.latent_shape == (4, 8, 8) and b.image_shape == (3, 16, 16)
        for module in (b.eps_fn, b.vae, *(e.encoder for e in b.text_encoders)):
            assert not any(p.requires_grad for p in module.parameters())
    assert sdxl.cond_shape == (CLIP_MAX_LENGTH + 1, CLIP_HIDDEN + CLIP_2_HIDDEN)
    assert sd3.cond_shape == (CLIP_MAX_LENGTH + T5_LENGTH + 1, T5_HIDDEN)
    assert flux.cond_shape == (T5_LENGTH + 1, T5_HIDDEN)
    assert (sdxl.guidance, sd3.guidance, flux.guidance) == ("cfg", "cfg", "embedded")
    assert sdxl.token_dim == CLIP_HIDDEN + CLIP_2_HIDDEN
    assert sd3.token_dim == CLIP_HIDDEN + CLIP_2_HIDDEN + T5_HIDDEN
    assert flux.token_dim == CLIP_HIDDEN + T5_HIDDEN


def test_model_options_are_checked(dirs, tmp_path):
    with pytest.raises(ValueError, match="takes no option max_sequence_length"):
        load_model(f"diffusers:{dirs['sdxl']}?max_sequence_length=8")
    with pytest.raises(ValueError, match="unknown model option 'heigth'"):
        load_model(f"diffusers:{dirs['flux']}?heigth=16")
    with pytest.raises(ValueError, match="not a valid int"):
        load_model(f"diffusers:{dirs['flux']}?height=big")
    with pytest.raises(ValueError, match="multiples of 4"):
        load_model(f"diffusers:{dirs['flux']}?height=18&width=16")
    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(ValueError, match="KandinskyPipeline; supported pipelines"):
        load_model(f"diffusers:{tmp_path}")
    with pytest.raises(FileNotFoundError, match="missing"):
        (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
        load_model(f"diffusers:{tmp_path}")


def test_sd3_without_t5_uses_zero_t5_rows(tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp)
        path = build_tiny_sd3(tmp_path / "sd3", t5=False)
        b = load_model(f"diffusers:{path}?max_sequence_length={T5_LENGTH}", dtype=torch.float64)
    assert not b.has_t5 and b.token_dim == CLIP_HIDDEN + CLIP_2_HIDDEN
    cond = b.encode(2, prompt=PROMPT).cond
    tokens, pooled = b.layout.unpack(cond)
    assert torch.equal(tokens[:, CLIP_MAX_LENGTH:], torch.zeros_like(tokens[:, CLIP_MAX_LENGTH:]))
    assert float(tokens[:, :CLIP_MAX_LENGTH].abs().max()) > 0 and pooled.shape == (2, SD3_POOLED_DIM)


# --------------------------------------------------------------------------- the stock pipelines


def _pipeline(dirs, family):
    import diffusers

    cls = {"sdxl": diffusers.StableDiffusionXLPipeline, "sd3": diffusers.StableDiffusion3Pipeline,
           "flux": diffusers.FluxPipeline}[family]
    pipe = cls.from_pretrained(dirs[family], local_files_only=True).to(torch.float64)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", list(BUILDERS))
def test_sample_equals_the_stock_pipeline(dirs, backends, family, offline):
    """Our Euler (DDIM = Euler in ρ) on the pipeline's own timesteps gives the pipeline's latents:
    the text encoding, the packing, the conditioning inputs and the timestep conventions all match."""
    import diffusers

    b, pipe = backends[family], _pipeline(dirs, family)
    x_T = b.noise(2, seed=0)
    prompts = ["a photo of a cat", "a painting of a dog"]
    scale, steps = 3.0, 6
    if family == "sdxl":
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=False,
                                                             clip_sample=False)
        ref = pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=scale, latents=x_T.clone(),
                   output_type="latent").images
        timesteps = [float(t) for t in pipe.scheduler.timesteps] + [0.0]
    else:
        sigmas = list(np.linspace(0.999, 1 / steps, steps))  # from t_max: y = x/α needs α > 0
        kw = dict(height=16, width=16) if family == "flux" else {}
        latents = pack_latents(x_T) if family == "flux" else x_T.clone()
        ref = pipe(prompt=prompts, sigmas=sigmas, guidance_scale=scale, latents=latents,
                   max_sequence_length=T5_LENGTH, output_type="latent", **kw).images
        timesteps = sigmas + [0.0]
    c = b.guide(b.encode(2, prompt=prompts), scale)
    ours = sample(b.eps_fn, x_T, c.cond, uncond=c.uncond, guidance_scale=cfg_scale(b, scale),
                  schedule=b.schedule, steps=None, timesteps=timesteps, solver="euler", grad_mode="none",
                  prediction=b.prediction)
    if family == "flux":
        ours = pack_latents(ours)
    assert _rel(ours, ref) < 1e-6  # measured 3e-8–1e-7: the schedulers step in float32
    assert offline == []


@pytest.fixture
def offline(monkeypatch):
    return _offline(monkeypatch)


# --------------------------------------------------------------------------- conditioning


def test_textual_inversion_reproduces_a_vocabulary_word_in_every_encoder(backends):
    def hooks(b):
        return [len(m._forward_hooks) for e in b.text_encoders for m in e.encoder.modules()]

    for b in backends.values():
        b.encode(1, prompt=PROMPT)  # transformers adds its own output hooks on a first call
        before = hooks(b)
        cat = b.token_init("cat")  # one token in every tiny vocabulary
        inv = b.encode_with_token(2, "a photo of a <*>", cat)
        ref = b.encode(2, prompt=PROMPT)
        torch.testing.assert_close(inv.cond, ref.cond, rtol=0, atol=1e-12)
        dog = b.encode_with_token(1, "a photo of a <*>", b.token_init("dog")).cond
        assert not torch.allclose(dog, ref.cond[:1])
        # a token in one encoder only changes that encoder's part of cond
        widths = [e.width for e in b.text_encoders]
        mixed = torch.cat([p if k else q for k, (p, q) in
                           enumerate(zip(cat.split(widths), b.token_init("dog").split(widths)))])
        assert not torch.allclose(b.encode_with_token(1, "a photo of a <*>", mixed).cond, ref.cond[:1])
        with pytest.raises(ValueError, match="shape"):
            b.encode_with_token(1, "a <*>", cat[:-1])
        assert hooks(b) == before  # the substitutions lived only for their own calls


def test_sdxl_zeroes_an_empty_negative_prompt(backends):
    b = backends["sdxl"]
    c = b.encode(2, prompt=PROMPT)
    assert torch.equal(c.uncond, torch.zeros_like(c.uncond))  # force_zeros_for_empty_prompt
    neg = b.encode(2, prompt=PROMPT, negative_prompt="a dog")
    torch.testing.assert_close(neg.uncond, b.encode(2, prompt="a dog").cond, rtol=0, atol=0)


def test_flux_takes_guidance_as_an_input(backends):
    b = backends["flux"]
    c = b.encode(1, prompt=PROMPT)
    assert c.uncond is None
    with pytest.raises(ValueError, match="no negative prompt"):
        b.encode(1, prompt=PROMPT, negative_prompt="a dog")
    x_T = b.noise(1, seed=1)
    runs = {s: sample(b.eps_fn, x_T, b.guide(c, s).cond, schedule=b.schedule, steps=4, grad_mode="none",
                      **declared(b)) for s in (1.0, 3.5, None)}
    assert torch.equal(runs[3.5], runs[None])  # None: the default, 3.5
    assert _rel(runs[1.0], runs[3.5]) > 1e-3
    # ∂L/∂cond holds ∂L/∂guidance: check it against a central difference in float64
    cond = b.guide(c, 2.0).cond.detach().requires_grad_()
    loss = sample(b.eps_fn, x_T, cond, schedule=b.schedule, steps=4, **declared(b)).square().mean()
    (g,) = torch.autograd.grad(loss, cond)
    _, vector = b.layout.unpack(g)
    h = 1e-4
    with torch.no_grad():
        fd = [sample(b.eps_fn, x_T, b.guide(c, 2.0 + s * h).cond, schedule=b.schedule, steps=4,
                     grad_mode="none", **declared(b)).square().mean() for s in (1, -1)]
    # diffusers embeds 1000·guidance sinusoidally in float32, which limits the difference quotient
    # (measured: h = 1e-2, 1e-3, 1e-4, 1e-5 give -0.48, -1.259, -1.3917, -1.403 for -1.3929)
    assert float(vector[0, -1]) == pytest.approx(float((fd[0] - fd[1]) / (2 * h)), rel=5e-3)


def test_packing_round_trips_and_pads_with_zeros():
    layout = TokensAndVector(tokens=3, width=4, vector=6)  # the vector needs two rows
    assert layout.shape == (5, 4)
    tokens, vector = torch.randn(2, 3, 4), torch.randn(2, 6)
    packed = layout.pack(tokens, vector)
    assert packed.shape == (2, 5, 4)
    assert torch.equal(packed[:, 4, 2:], torch.zeros(2, 2))
    t, v = layout.unpack(packed)
    assert torch.equal(t, tokens) and torch.equal(v, vector)
    with pytest.raises(ValueError, match="cannot pack"):
        layout.pack(tokens, vector[:, :5])


# --------------------------------------------------------------------------- gradients


def _full_path(b, mode, eps_fn, token0, x_seed=0):
    """x_T, prompt with a learned token → sample (CFG or guidance input) → decode → pixel loss."""
    x_T = b.noise(2, seed=x_seed).requires_grad_()
    token = token0.clone().requires_grad_()
    c = b.guide(b.encode_with_token(2, "a photo of <*>", token), 3.0)
    cond = c.cond
    cond.retain_grad()
    x0 = sample(eps_fn, x_T, cond, uncond=c.uncond, guidance_scale=cfg_scale(b, 3.0), schedule=b.schedule,
                steps=3, grad_mode=mode, **declared(b))
    image = b.decode(x0)
    target = torch.linspace(0, 1, image[0].numel(), dtype=image.dtype).reshape(image.shape[1:])
    loss = (image - target).square().mean()
    weights = [p for p in eps_fn.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x_T, cond, token, *weights])
    return loss.detach(), grads, len(weights)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_checkpoint_equals_backprop_for_every_target(backends, family):
    """x_T, the packed embeddings (every encoder's output and the pooled ones), the token through
    every encoder, and LoRA weights (peft; A and B random so both get gradients)."""
    b = backends[family]
    lora = with_lora(b.eps_fn, rank=2, targets=b.lora_targets)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    token0 = b.random_token(seed=1)
    loss_bp, g_bp, n = _full_path(b, "backprop", lora, token0)
    loss_ck, g_ck, _ = _full_path(b, "checkpoint", lora, token0)
    assert n > 0 and torch.equal(loss_bp, loss_ck)
    for k, (a, c) in enumerate(zip(g_bp, g_ck)):
        assert torch.isfinite(c).all() and float(c.abs().max()) > 0, f"input {k}"
        assert _rel(c, a) < 1e-9, f"input {k}"
    # every encoder's part of cond gets a gradient, and so does every encoder's part of the token
    g_cond, g_token = g_ck[1], g_ck[2]
    tokens, vector = b.layout.unpack(g_cond)
    assert float(vector.abs().max()) > 0
    for piece in g_token.split([e.width for e in b.text_encoders]):
        assert float(piece.abs().max()) > 0


# --------------------------------------------------------------------------- the shared contract


class _FamilyContract(BackendContract):
    family = ""

    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls, tmp_path_factory):
        with pytest.MonkeyPatch.context() as mp:
            _offline(mp)
            path = BUILDERS[cls.family](tmp_path_factory.mktemp(cls.family))
            return load_model(f"diffusers:{path}{OPTIONS[cls.family]}")

    def conditioning(self, backend, batch):
        c = backend.guide(backend.encode(batch, prompt=PROMPT), self.guidance)
        cond = c.cond.detach().requires_grad_()
        return cond, c.uncond, cond


class TestSDXLTiny(_FamilyContract):
    family = "sdxl"


class TestSD3Tiny(_FamilyContract):
    family = "sd3"


class TestFluxTiny(_FamilyContract):
    family = "flux"
