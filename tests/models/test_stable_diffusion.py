"""The `diffusers` backend on a tiny Stable Diffusion pipeline built from config (tiny_sd.py).

Prompt → CLIP → ``sample`` with CFG → VAE decode → pixel loss, differentiated w.r.t. ``x_T``, the
prompt embedding, a textual-inversion token and LoRA weights (``with_lora``, the adapter every
family and the service use); ``checkpoint`` must equal ``backprop`` through the whole path
(float64), and the resident model must stay bit-for-bit as it was. A v-prediction UNet is
declared (``prediction = "v"``) and sampled through the core's conversion, checked against
diffusers' own DDIM loop. Everything is loaded with the network cut off: no hub access, ever.
"""

import copy
import hashlib
import socket
import threading

import pytest
import torch

from adjointdpm_server.core import sample
from adjointdpm_server.models._adapters import with_lora
from adjointdpm_server.models._diffusers import StableDiffusionBackend, TextConditionalEps

from .tiny_sd import HIDDEN, MAX_LENGTH, build_tiny_sd

PROMPT = "a photo of a cat"
STEPS = 4
GUIDANCE = 3.0


def _offline(mp: pytest.MonkeyPatch) -> list:
    """HF_HUB_OFFLINE=1 and sockets that refuse to connect; returns the list of attempts."""
    attempts = []

    def refuse(sock, address, *args):
        attempts.append(address)
        raise OSError(f"network access attempted in a test: {address!r}")

    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket.socket, "connect_ex", refuse)
    return attempts


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp)
        return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="module")
def backend(sd_dir):
    with pytest.MonkeyPatch.context() as mp:
        attempts = _offline(mp)
        backend = StableDiffusionBackend(sd_dir, dtype=torch.float64)
    assert attempts == []
    return backend


@pytest.fixture
def offline(monkeypatch):
    return _offline(monkeypatch)


def _digest(*modules) -> str:
    h = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        h.update(bytes(p.requires_grad for p in module.parameters()))
    return h.hexdigest()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _pixel_loss(image):
    target = torch.linspace(0, 1, image[0].numel(), dtype=image.dtype).reshape(image.shape[1:])
    return (image - target).square().mean()


# --------------------------------------------------------------------------- loading


def test_loads_the_tiny_pipeline(backend, sd_dir, offline):
    assert backend.name == "diffusers" and backend.prediction == "epsilon"
    assert backend.vae_scale_factor == 2
    assert backend.latent_shape == (4, 8, 8) and backend.image_shape == (3, 16, 16)
    assert backend.schedule.t_min == 0.0 and backend.schedule.t_max == 999.0
    assert type(backend.eps_fn) is TextConditionalEps and backend.dtype == torch.float64
    for module in (backend.unet, backend.vae, backend.text_encoder):
        assert not any(p.requires_grad for p in module.parameters()) and not module.training
    assert backend.max_length == MAX_LENGTH
    from adjointdpm_server.models import load_model

    assert load_model(f"diffusers:{sd_dir}").latent_shape == (4, 8, 8)
    assert offline == []


def test_image_size_override(sd_dir, offline):
    wide = StableDiffusionBackend(sd_dir, height=12, width=20)
    assert wide.dtype == torch.float32
    assert wide.latent_shape == (4, 6, 10) and wide.image_shape == (3, 12, 20)
    c = wide.encode(1, prompt=PROMPT)
    with torch.no_grad():
        x = wide.noise(1, seed=0)
        assert wide.eps(x, torch.full((1,), 500.0), c.cond).shape == x.shape
        assert wide.decode(x).shape == (1, 3, 12, 20)
    with pytest.raises(ValueError, match="multiples of 2"):
        StableDiffusionBackend(sd_dir, height=15)
    assert offline == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "float16"])
def test_half_precision_on_cpu_is_refused(sd_dir, dtype):
    with pytest.raises(ValueError, match="needs a GPU"):
        StableDiffusionBackend(sd_dir, device="cpu", dtype=dtype)


def test_missing_directory_is_a_clear_local_error(tmp_path, offline):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StableDiffusionBackend(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StableDiffusionBackend("runwayml/stable-diffusion-v1-5")  # a hub id is not a directory
    (tmp_path / "partial" / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="missing vae/, text_encoder/, tokenizer/, scheduler/"):
        StableDiffusionBackend(tmp_path / "partial")
    assert offline == []


@pytest.fixture(scope="module")
def v_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp)
        return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd-v"), prediction_type="v_prediction")


def test_v_prediction_is_declared_and_converted_to_eps(v_dir, offline):
    """No wrapper: the UNet's v is what ``eps_fn`` returns, the backend says so, and ``eps`` (the
    core's map) gives ε = σx + αv, the identity diffusers' schedulers use."""
    v_backend = StableDiffusionBackend(v_dir)
    assert v_backend.prediction == "v" and type(v_backend.eps_fn) is TextConditionalEps
    x = v_backend.noise(2, seed=3)
    t = torch.tensor([10.0, 700.0])
    cond = v_backend.encode(2, prompt=PROMPT).cond
    with torch.no_grad():
        v = v_backend.unet(x, t, encoder_hidden_states=cond).sample
        torch.testing.assert_close(v_backend.eps_fn(x, t, cond), v, rtol=0, atol=0)
        eps = v_backend.eps(x, t, cond)
    alpha, sigma = (f(t.double()).float().reshape(-1, 1, 1, 1)
                    for f in (v_backend.schedule.alpha, v_backend.schedule.sigma))
    torch.testing.assert_close(eps, sigma * x + alpha * v)
    assert offline == []


@pytest.mark.parametrize("guidance", [None, GUIDANCE])
def test_v_prediction_sampling_reproduces_diffusers_ddim(v_dir, offline, guidance):
    """External reference: diffusers' DDIM loop (built from the directory's own scheduler config,
    ``prediction_type="v_prediction"``) on the v UNet, CFG on the raw v as diffusers' pipelines do;
    Euler in ρ on the same timesteps with ``prediction=backend.prediction`` is the same loop
    (tests/core/test_diffusers_ddim.py for ε). Treating v as ε must not pass."""
    from diffusers import DDIMScheduler

    v_backend = StableDiffusionBackend(v_dir, dtype=torch.float64)
    sched = DDIMScheduler.from_pretrained(v_dir, subfolder="scheduler", clip_sample=False,
                                          timestep_spacing="leading")
    assert sched.config.prediction_type == "v_prediction" and not sched.config.set_alpha_to_one
    sched.set_timesteps(12)
    c = v_backend.encode(2, prompt=PROMPT)
    x_T = v_backend.noise(2, seed=5)
    x = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            tt = t.expand(2).to(torch.float64)
            if guidance is None:
                v = v_backend.eps_fn(x, tt, c.cond)
            else:
                v_c, v_u = v_backend.eps_fn(torch.cat([x, x]), torch.cat([tt, tt]),
                                            torch.cat([c.cond, c.uncond])).chunk(2)
                v = v_u + guidance * (v_c - v_u)
            x = sched.step(v, t, x, eta=0.0).prev_sample
        ts = [float(t) for t in sched.timesteps] + [0.0]  # DDIM's last step lands on ᾱ_0: our t = 0
        kw = dict(schedule=v_backend.schedule, steps=None, timesteps=ts, solver="euler",
                  grad_mode="none", guidance_scale=guidance, uncond=c.uncond)
        ours = sample(v_backend.eps_fn, x_T, c.cond, prediction=v_backend.prediction, **kw)
        as_eps = sample(v_backend.eps_fn, x_T, c.cond, **kw)
    assert _rel(ours, x) < 3e-7  # measured 8e-8 (CFG 3): diffusers takes √ᾱ in float32
    assert _rel(as_eps, x) > 1e-2
    assert offline == []


# --------------------------------------------------------------------------- conditioning


def test_encode_prompts(backend):
    c = backend.encode(3, prompt=PROMPT)
    assert c.cond.shape == c.uncond.shape == (3, MAX_LENGTH, HIDDEN)
    assert torch.equal(c.cond[0], c.cond[2]) and not c.cond.requires_grad and c.cond.is_leaf
    assert torch.equal(c.uncond, backend.encode(3, prompt="").cond)  # SD's "" unconditional
    two = backend.encode(2, prompt=["a photo of a cat", "a photo of a dog"], negative_prompt="dog")
    assert not torch.equal(two.cond[0], two.cond[1])
    torch.testing.assert_close(two.cond[0], c.cond[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(two.uncond[0], backend.encode(1, prompt="dog").cond[0], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="2 prompts for a batch of 3"):
        backend.encode(3, prompt=["a cat", "a dog"])
    with pytest.raises(ValueError, match="not class labels"):
        backend.encode(2, labels=[1, 2])
    with pytest.raises(ValueError, match="negative prompt"):
        backend.encode(2, prompt=PROMPT, negative_prompt=["a", "b", "c"])


def test_textual_inversion_reproduces_a_vocabulary_token(backend):
    before = (len(backend.tokenizer), _digest(backend.text_encoder))
    table = backend.text_encoder.get_input_embeddings()
    cat = table.weight[backend.tokenizer.convert_tokens_to_ids("cat</w>")].clone()
    inv = backend.encode_with_token(2, "a photo of a <*>", cat)
    ref = backend.encode(2, prompt=PROMPT)
    torch.testing.assert_close(inv.cond, ref.cond, rtol=0, atol=1e-12)
    torch.testing.assert_close(inv.uncond, ref.uncond, rtol=0, atol=0)
    both = backend.encode_with_token(1, "a <*> photo of <*>!", cat, placeholder="<*>")
    torch.testing.assert_close(both.cond, backend.encode(1, prompt="a cat photo of cat!").cond,
                               rtol=0, atol=1e-12)
    for bad in (dict(prompt="a cat", token_embedding=cat),
                dict(prompt="a <*>", token_embedding=cat[:5]),
                dict(prompt="a " * 20 + "<*>", token_embedding=cat)):
        with pytest.raises(ValueError):
            backend.encode_with_token(1, **bad)
    assert not table._forward_hooks  # the substitution lived only for its own call
    assert (len(backend.tokenizer), _digest(backend.text_encoder)) == before


def test_textual_inversion_does_not_leak_into_concurrent_encodes(backend):
    ref = backend.encode(1, prompt="a photo of a dog").cond
    token = torch.randn(HIDDEN, dtype=torch.float64)
    errors = []

    def plain():
        for _ in range(30):
            if not torch.equal(backend.encode(1, prompt="a photo of a dog").cond, ref):
                errors.append("leak")

    thread = threading.Thread(target=plain)
    thread.start()
    for _ in range(30):
        backend.encode_with_token(1, "a photo of a <*>", token)
    thread.join()
    assert errors == []


# --------------------------------------------------------------------------- gradients


def _full_path(backend, mode, eps_fn, token0=None, steps=STEPS):
    """x_T, prompt (or textual-inversion token) → sample with CFG → decode → pixel loss → grads."""
    x_T = backend.noise(2, seed=0).requires_grad_()
    if token0 is None:
        c = backend.encode(2, prompt=PROMPT)
        cond, leaves = c.cond.requires_grad_(), []
    else:
        token = token0.clone().requires_grad_()
        c = backend.encode_with_token(2, "a photo of <*>", token)
        cond, leaves = c.cond, [token]  # cond is the encoder's output: differentiable through it
    uncond = c.uncond.requires_grad_()
    x0 = sample(eps_fn, x_T, cond, schedule=backend.schedule, steps=steps, grad_mode=mode,
                guidance_scale=GUIDANCE, uncond=uncond, prediction=backend.prediction)
    image = backend.decode(x0)
    assert image.shape == (2, *backend.image_shape)
    assert float(image.detach().min()) >= 0.0 and float(image.detach().max()) <= 1.0
    loss = _pixel_loss(image)
    weights = [p for p in eps_fn.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x_T, cond, uncond, *leaves, *weights])
    return loss.detach(), grads


@pytest.mark.parametrize("variant", ["prompt", "inversion+lora", "v-prediction+inversion+lora"])
def test_checkpoint_equals_backprop_through_decode(backend, v_dir, variant):
    if variant.startswith("v-prediction"):  # the core's v → ε conversion inside both passes
        backend = StableDiffusionBackend(v_dir, dtype=torch.float64)
        assert backend.prediction == "v"
    resident = _digest(backend.unet, backend.vae, backend.text_encoder)
    if variant == "prompt":
        eps_fn, token0 = backend.eps_fn, None
    else:
        # A and B random: both get grads
        eps_fn = with_lora(backend.eps_fn, rank=2, targets=backend.lora_targets, init_lora_weights=False)
        token0 = torch.randn(HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    loss_bp, g_bp = _full_path(backend, "backprop", eps_fn, token0)
    loss_ck, g_ck = _full_path(backend, "checkpoint", eps_fn, token0)
    assert torch.equal(loss_bp, loss_ck)
    n_lora = len(g_bp) - (3 if token0 is None else 4)
    # (A, B) × 4 targets × 2 attentions × 4 transformer blocks (down, mid, 2 up)
    assert n_lora == (0 if token0 is None else 2 * 4 * 2 * 4)
    for k, (a, b) in enumerate(zip(g_bp, g_ck)):
        assert torch.isfinite(b).all() and float(b.abs().max()) > 0, f"input {k}"
        assert _rel(b, a) < 1e-9, f"input {k}"
    assert _digest(backend.unet, backend.vae, backend.text_encoder) == resident


def test_adjoint_converges_to_checkpoint(backend):
    """``adjoint`` re-solves the trajectory backward, so it differs from the exact gradient by the
    reconstruction error; measured (random weights, CFG 3, rel. L2 for x_T / cond / uncond):
    8 steps 0.05 / 0.17 / 0.16, 16 steps 0.008 / 0.030 / 0.030."""
    dist = {}
    for steps in (8, 16):
        _, g_ck = _full_path(backend, "checkpoint", backend.eps_fn, steps=steps)
        _, g_adj = _full_path(backend, "adjoint", backend.eps_fn, steps=steps)
        dist[steps] = [_rel(b, a) for a, b in zip(g_ck, g_adj)]
    assert max(dist[16]) < 0.06, dist
    assert all(d16 < d8 / 3 for d8, d16 in zip(dist[8], dist[16])), dist


def test_float32_checkpoint_matches_backprop(sd_dir):
    backend32 = StableDiffusionBackend(sd_dir)
    _, g_bp = _full_path(backend32, "backprop", backend32.eps_fn)
    _, g_ck = _full_path(backend32, "checkpoint", backend32.eps_fn)
    for a, b in zip(g_bp, g_ck):
        assert b.dtype == torch.float32 and _rel(b, a) < 1e-5


# --------------------------------------------------------------------------- the resident model


def test_lora_and_inversion_leave_the_resident_model_untouched(backend):
    resident = _digest(backend.unet, backend.vae, backend.text_encoder)
    n_vocab = len(backend.tokenizer)
    x = backend.noise(2, seed=4)
    t = torch.tensor([900.0, 50.0])
    cond = backend.encode(2, prompt=PROMPT).cond
    with torch.no_grad():
        base_eps = backend.eps(x, t, cond)

    lora = with_lora(backend.eps_fn, rank=4, targets=backend.lora_targets)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # no base tensor is copied: the copy's non-LoRA tensors *are* the resident ones, all of them
    base = [t for n, t in (*lora.named_parameters(), *lora.named_buffers()) if "lora_" not in n]
    resident_tensors = [*backend.eps_fn.parameters(), *backend.eps_fn.buffers()]
    assert len(base) == len(resident_tensors)
    assert {id(t) for t in base} == {id(t) for t in resident_tensors}
    with torch.no_grad():  # B = 0 at init: the adapted model starts as the base one
        torch.testing.assert_close(lora(x, t, cond), base_eps, rtol=0, atol=0)

    token = torch.zeros(HIDDEN, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad] + [token], lr=1.0)
    for _ in range(2):
        c = backend.encode_with_token(2, "a <*> photo", token)
        x0 = sample(lora, x, c.cond, schedule=backend.schedule, steps=2, guidance_scale=GUIDANCE,
                    uncond=c.uncond, prediction=backend.prediction)
        opt.zero_grad()
        _pixel_loss(backend.decode(x0)).backward()
        opt.step()
    with torch.no_grad():
        assert not torch.equal(lora(x, t, cond), base_eps)  # the copy did train …
        assert torch.equal(backend.eps(x, t, cond), base_eps)  # … the resident model did not
    assert _digest(backend.unet, backend.vae, backend.text_encoder) == resident
    assert len(backend.tokenizer) == n_vocab
    assert not any("lora" in n for n, _ in backend.unet.named_parameters())
    assert {id(t) for t in base} == {id(t) for t in resident_tensors}  # still shared, not replaced


def test_with_lora_is_seeded_and_float32_under_a_half_base(backend):
    """The same request makes the same adapter, and the process's random state is left alone;
    under a half-precision base the adapter itself is float32 (what is trained)."""
    made = []
    for seed in (1, 2):  # whatever the process's random state, the same adapter …
        torch.manual_seed(seed)
        state = torch.random.get_rng_state()
        made.append(with_lora(backend.eps_fn, rank=2, targets=backend.lora_targets, init_lora_weights=False))
        assert torch.equal(torch.random.get_rng_state(), state)  # … and that state left alone
    a, b = made
    la, lb = ({n: p for n, p in m.named_parameters() if "lora_" in n} for m in (a, b))
    assert la.keys() == lb.keys() and all(torch.equal(la[n], lb[n]) for n in la)
    assert all(".default." in n and n.startswith("unet.") for n in la)  # the export's key layout
    half = TextConditionalEps(copy.deepcopy(backend.unet).half())
    lora = with_lora(half, rank=2, targets=backend.lora_targets)
    dtypes = {n: p.dtype for n, p in lora.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.float16}
    with pytest.raises(ValueError, match="not in this model"):
        with_lora(backend.eps_fn, rank=2, targets=("no_such_layer",))
