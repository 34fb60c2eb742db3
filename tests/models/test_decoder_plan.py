"""The VAE decoder in an image-domain gradient, planned (models/_decoding.py, design §2.4.4).

On every diffusers family (SD, SDXL, SD3-type, FLUX-type; tiny pipelines from config), in float64
and float32: decoding in slices recomputed in the backward pass, and checkpointed inside the
decoder, gives the gradient of plain decoding (1e-10 / 1e-6), slices of one sample included (each
sample's gradient as in the whole batch). The forward keeps no graph; checkpointing really
recomputes the decoder's blocks; the measurement is the graph's real size and keeps nothing; the
plan is the cheapest that fits, or none. ``force_upcast`` loads the VAE in float32 under float16.
"""

from __future__ import annotations

import threading

import pytest
import torch
from diffusers import AutoencoderKL
from torch.autograd.graph import saved_tensors_hooks

from adjointdpm_server.core._memory import GraphGuard
from adjointdpm_server.errors import ResourceExhausted
from adjointdpm_server.models import _decoding
from adjointdpm_server.models import load_model
from adjointdpm_server.models._decoding import (ALLOCATOR_SLACK, GATED, HIGH_RES_UP_BLOCKS, PLAIN, Checkpointing,
                                                DecodePlan, DecoderGraph, plan_decode)
from adjointdpm_server.models._latent import vae_dtype

from .test_stable_diffusion import _offline
from .tiny_families import build_tiny_flux, build_tiny_sd3, build_tiny_sdxl
from .tiny_sd import build_tiny_sd

BUILDERS = {"sd": build_tiny_sd, "sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3, "flux": build_tiny_flux}
OPTIONS = {"sd": "", "sdxl": "", "sd3": "?max_sequence_length=24",
           "flux": "?height=16&width=16&max_sequence_length=24"}
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-6}
BATCH = 3


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp)
        return {family: build(root / family) for family, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def backends(paths):
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp)
        for family, path in paths.items():
            for dtype in TOLERANCE:
                out[family, dtype] = b = load_model(f"diffusers:{path}{OPTIONS[family]}", dtype=dtype)
                _distinct_norms(b.vae.decoder)
    return out


def _distinct_norms(decoder, seed: int = 7) -> None:
    """Group norms built from config are all identities (weight 1, bias 0), so one would pass
    for another; each its own affine map, the same at every dtype."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in decoder.modules():
            if isinstance(m, torch.nn.GroupNorm) and m.affine:
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g, dtype=torch.float64))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g, dtype=torch.float64))


def _latents(b, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.5 * torch.randn((BATCH, *b.latent_shape), generator=g, dtype=torch.float64)).to(b.dtype)


def _weights(b, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((BATCH, *b.image_shape), generator=g, dtype=torch.float64).to(b.dtype)


def _gradient(b, plan) -> torch.Tensor:
    """∂⟨decode(x0), w⟩/∂x0 (plus a square, so the loss is not linear in the image)."""
    x0 = _latents(b).requires_grad_()
    image = b.decode(x0, plan)
    loss = (image * _weights(b)).sum() + (image ** 2).sum()
    return torch.autograd.grad(loss, x0)[0]


BLOCKS, FINE = Checkpointing.BLOCKS, Checkpointing.FINE
PLANS = {"slices of 1": DecodePlan(1), "slices of 2": DecodePlan(2), "blocks": DecodePlan(0, BLOCKS),
         "blocks, slices of 1": DecodePlan(1, BLOCKS), "blocks, slices of 2": DecodePlan(2, BLOCKS),
         "fine": DecodePlan(0, FINE), "fine, slices of 1": DecodePlan(1, FINE),
         "fine, slices of 2": DecodePlan(2, FINE)}


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("family", list(BUILDERS))
def test_every_plan_gives_the_plain_gradient(backends, family, dtype):
    """float64: every plan within 1e-10 of plain decoding. float32: checkpointing changes no bit;
    slicing changes how the convolutions sum (a batch of one or of three: oneDNN's kernels), which
    moves float32 results by ~1-2e-6 (relative L2) — the float64 case says the plans are exact."""
    b = backends[family, dtype]
    plain = _gradient(b, PLAIN)
    assert plain.abs().max() > 0
    for name, plan in PLANS.items():
        got = _gradient(b, plan)
        if dtype == torch.float64:
            err = ((got - plain).abs().max() / plain.abs().max()).item()
            assert err <= TOLERANCE[dtype], (family, name, err)
        else:
            err = ((got - plain).norm() / plain.norm()).item()
            assert err <= 5 * TOLERANCE[dtype], (family, name, err)
            unchecked = _gradient(b, DecodePlan(plan.slice_size))
            assert torch.equal(got, unchecked), (family, name)  # checkpointing: bit-equal


@pytest.mark.parametrize("family", list(BUILDERS))
def test_each_samples_gradient_is_its_own_in_the_whole_batch(backends, family):
    """Slices of one sample: sample k's gradient equals decoding k alone — and the whole batch's."""
    b = backends[family, torch.float64]
    whole = _gradient(b, PLAIN)
    x0, w = _latents(b), _weights(b)
    for k in range(BATCH):
        xk = x0[k:k + 1].clone().requires_grad_()
        image = b.decode(xk, PLAIN)
        alone = torch.autograd.grad((image * w[k:k + 1]).sum() + (image ** 2).sum(), xk)[0]
        torch.testing.assert_close(whole[k:k + 1], alone, rtol=1e-10, atol=1e-12)


def _saved(fn) -> int:
    count = [0]

    def pack(t):
        count[0] += 1
        return t
    with saved_tensors_hooks(pack, lambda t: t):
        fn()
    return count[0]


def test_a_sliced_forward_keeps_no_graph_of_the_decoder(backends):
    b = backends["sd", torch.float64]
    x0 = _latents(b).requires_grad_()
    assert _saved(lambda: b.decode(x0, DecodePlan(1))) == 1  # x0 alone, for the recomputation
    assert _saved(lambda: b.decode(x0, PLAIN)) > 20          # today's: the decoder's activations


def _block_calls_in_backward(b, plan) -> int:
    """Convolutions inside the decoder's gated blocks run inside the backward pass (a block's
    checkpoint recomputes its forward, not its module call: count what it calls)."""
    calls = {"n": 0}

    def hook(*_):
        if torch._C._current_graph_task_id() != -1:
            calls["n"] += 1
    convs = [c for m in b.vae.decoder.modules() if type(m).__name__ in GATED
             for c in m.modules() if isinstance(c, torch.nn.Conv2d)]
    handles = [c.register_forward_pre_hook(hook) for c in convs]
    try:
        _gradient(b, plan)
    finally:
        for h in handles:
            h.remove()
    return calls["n"]


@pytest.mark.parametrize("family", list(BUILDERS))
def test_checkpointing_recomputes_each_decoder_block_once_more(backends, family):
    b = backends[family, torch.float64]
    blocks = sum(isinstance(c, torch.nn.Conv2d) for m in b.vae.decoder.modules()
                 if type(m).__name__ in GATED for c in m.modules())  # their convolutions
    assert blocks > 0
    assert _block_calls_in_backward(b, PLAIN) == 0                       # the graph was kept
    assert _block_calls_in_backward(b, DecodePlan(0, BLOCKS)) == blocks  # each block again, batched
    assert _block_calls_in_backward(b, DecodePlan(1)) == BATCH * blocks  # each slice's forward again
    assert _block_calls_in_backward(b, DecodePlan(1, BLOCKS)) == 2 * BATCH * blocks  # and each block
    # FINE: the trunk (mid block and all up blocks but the last) once more, then its blocks
    # again — but its last block: the trunk's backward needs only that block's input, and
    # torch's checkpoint stops its recomputation there
    decoder = b.vae.decoder
    trunk = [decoder.mid_block, *decoder.up_blocks[:max(0, len(decoder.up_blocks) - HIGH_RES_UP_BLOCKS)]]
    assert trunk[1:] == list(decoder.up_blocks)[:-1]  # every up block but the last
    ran = []
    hooks = [m.register_forward_pre_hook(lambda m, _: ran.append(m)) for t in trunk for m in t.modules()
             if type(m).__name__ in GATED]
    with torch.no_grad():
        b.decode(_latents(b), PLAIN)
    for h in hooks:
        h.remove()
    convs = [sum(isinstance(c, torch.nn.Conv2d) for c in m.modules()) for m in ran]
    assert 0 < sum(convs) < blocks
    assert _block_calls_in_backward(b, DecodePlan(0, FINE)) == blocks + sum(convs[:-1])


def test_the_checkpoint_switch_is_the_backward_passes_own(backends):
    """After a checkpointed backward the switch is off again, and another thread's decode beside
    a switched-on one is plain (a context variable, not the shared decoder's state)."""
    b = backends["sd", torch.float64]
    _gradient(b, DecodePlan(1, FINE))
    assert _decoding._LEVEL.get() == Checkpointing.NONE
    x0 = _latents(b).requires_grad_()
    assert _saved(lambda: b._decode(x0)) > 20  # the decode with the switch as it stands
    counts = {}

    def other():
        counts["other"] = _saved(lambda: b._decode(_latents(b).requires_grad_()))
    with _decoding.checkpointed_decoder(BLOCKS):
        counts["here"] = _saved(lambda: b._decode(x0))
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert counts["other"] > counts["here"]


def _saved_bytes(b, fn, exclude=()) -> int:
    guard = GraphGuard(float("inf"), exclude=list(b.vae.decoder.parameters()) + list(exclude))
    with torch.enable_grad(), guard.watching():
        fn()
    return guard.bytes


@pytest.mark.parametrize("family", list(BUILDERS))
def test_the_measured_graph_is_the_graph(backends, family):
    """What stays saved at each level is what a decode at that level saves (the checkpoints keep
    their inputs), each level holds less than the one before, and BLOCKS' peak is what stays
    saved plus the largest block's own graph, each block measured alone."""
    b = backends[family, torch.float32]
    graph = b.decoder_graph()
    assert b.decoder_graph() is graph  # measured once
    x = torch.zeros((1, *b.latent_shape), dtype=b.dtype).requires_grad_()
    for level in Checkpointing:
        assert graph.kept[level] == _saved_bytes(b, lambda: b.decode(x, DecodePlan(0, level))) > 0, level
    assert graph.plain == graph.kept[Checkpointing.NONE]
    assert graph.at(FINE) < graph.at(BLOCKS) < graph.plain
    assert graph.kept[FINE] < graph.kept[BLOCKS] < graph.at(BLOCKS)
    largest = 0
    for module in [m for m in b.vae.decoder.modules() if type(m).__name__ in GATED]:
        seen = []  # each block alone, from an input of the shape it sees, its input not counted
        h = module.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args, kwargs)),
                                             with_kwargs=True)
        with torch.no_grad():
            b.decode(x.detach(), PLAIN)
        h.remove()
        (first, *rest), kwargs = seen[0]
        first = first.clone().requires_grad_()
        largest = max(largest, _saved_bytes(b, lambda: module(first, *rest, **kwargs), [first]))
    assert graph.at(BLOCKS) == graph.kept[BLOCKS] + largest


def test_measuring_beside_another_jobs_decode_counts_only_its_own(backends):
    """The resident decoder is shared: a decode on another thread while one is measured is
    neither traced (it runs plain, with its graph) nor counted."""
    b = backends["sd", torch.float64]
    x = torch.zeros((1, *b.latent_shape), dtype=b.dtype)
    alone = _decoding.measure(b._decode, x, b.vae.decoder)
    started, done, grads = threading.Event(), threading.Event(), []

    def other():
        started.set()
        while not done.is_set():
            grads.append(_gradient(b, PLAIN))
    thread = threading.Thread(target=other)
    thread.start()
    started.wait()
    try:
        beside = [_decoding.measure(b._decode, x, b.vae.decoder) for _ in range(3)]
    finally:
        done.set()
        thread.join()
    assert grads and all(torch.equal(g, grads[0]) for g in grads)
    assert all(m == alone for m in beside)


def test_the_plan_is_the_cheapest_that_fits():
    g = DecoderGraph(held=(1000, 300, 200))
    slack, none = ALLOCATOR_SLACK, Checkpointing.NONE
    assert plan_decode(g, 4, None) == DecodePlan(0, none, 1000)
    assert plan_decode(g, 4, 4 * 1000 * slack) == DecodePlan(0, none, 1000)   # the whole batch
    assert plan_decode(g, 4, 4 * 1000 * slack - 1) == DecodePlan(3, none, 1000)
    assert plan_decode(g, 4, 2 * 1000 * slack) == DecodePlan(2, none, 1000)
    assert plan_decode(g, 4, 1000 * slack) == DecodePlan(1, none, 1000)
    assert plan_decode(g, 4, 1000 * slack - 1) == DecodePlan(3, BLOCKS, 300)
    assert plan_decode(g, 3, 3 * 300 * slack) == DecodePlan(0, BLOCKS, 300)      # the whole batch
    assert plan_decode(g, 4, 2 * 300 * slack) == DecodePlan(2, BLOCKS, 300)
    assert plan_decode(g, 4, 300 * slack) == DecodePlan(1, BLOCKS, 300)
    assert plan_decode(g, 4, 300 * slack - 1) == DecodePlan(1, FINE, 200)
    assert plan_decode(g, 1, 300 * slack - 1) == DecodePlan(0, FINE, 200)       # the whole batch
    assert plan_decode(g, 4, 200 * slack) == DecodePlan(1, FINE, 200)
    assert plan_decode(g, 4, 200 * slack - 1) is None


def test_a_backend_refuses_a_budget_no_exact_plan_fits(backends):
    b = backends["sd", torch.float32]
    graph = b.decoder_graph()
    assert b.plan_decoder(BATCH, None) == PLAIN
    assert b.plan_decoder(BATCH, graph.at(FINE) * ALLOCATOR_SLACK).checkpointing == FINE
    with pytest.raises(ResourceExhausted, match="VAE decoder"):
        b.plan_decoder(BATCH, graph.at(FINE) * ALLOCATOR_SLACK - 1)


def test_force_upcast_decodes_in_float32_under_float16(paths):
    assert vae_dtype(True, torch.float16) == torch.float32
    assert vae_dtype(True, torch.bfloat16) == torch.bfloat16
    assert vae_dtype(False, torch.float16) == torch.float16
    assert vae_dtype(True, torch.float32) == torch.float32
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp)
        b = load_model(f"diffusers:{paths['sdxl']}", dtype=torch.float32)
        forced = AutoencoderKL.load_config(paths["sdxl"], subfolder="vae").get("force_upcast", False)
        assert forced, "the tiny SDXL's VAE config must set force_upcast (diffusers' default)"
        vae = b._vae(AutoencoderKL, torch.float16)  # what a float16 server loads
        assert vae.dtype == torch.float32
    reference = b.decode(_latents(b)[:1])
    b.vae = vae
    half = b.decode(_latents(b)[:1].half())  # the decoder itself runs in float32
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), reference, atol=2e-3, rtol=0)
