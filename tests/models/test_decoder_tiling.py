"""Tiled decoding, approximate and only on request (models/_tiling.py, design §2.4.4).

On tiny SD and FLUX-type pipelines at 40×40 (latents 20×20, tiles of 8: four a side), float64:
the tiled image is diffusers' own ``tiled_decode``, and not the whole decode (approximate, named
so); its gradient is autograd's through ``tiled_decode`` at every slicing and checkpointing level
(1e-10) while the forward keeps no graph and the backward holds one tile's; an axis the tile
covers is not cut; a tile the image fits in decodes it whole and exactly; a tile that is no
multiple of 4 or under 8 is refused, and a budget below one tile's smallest plan is refused naming
the tile.
"""

from __future__ import annotations

import pytest
import torch

from adjointdpm_server.errors import InvalidArgument, ResourceExhausted
from adjointdpm_server.models import load_model
from adjointdpm_server.models._decoding import ALLOCATOR_SLACK, Checkpointing, DecodePlan
from adjointdpm_server.models._tiling import tile_starts

from .test_decoder_plan import _saved
from .test_stable_diffusion import _offline
from .tiny_families import build_tiny_flux
from .tiny_sd import build_tiny_sd

BUILDERS = {"sd": build_tiny_sd, "flux": build_tiny_flux}
OPTIONS = {"sd": "?height=40&width=40", "flux": "?height=40&width=40&max_sequence_length=24"}
TILE, BATCH = 8, 2
FINE, BLOCKS, NONE = Checkpointing.FINE, Checkpointing.BLOCKS, Checkpointing.NONE


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiling")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp)
        for family, build in BUILDERS.items():
            path = build(root / family)
            out[family] = load_model(f"diffusers:{path}{OPTIONS[family]}", dtype=torch.float64)
    return out


def _latents(b, shape=None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.5 * torch.randn((BATCH, *(shape or b.latent_shape)), generator=g, dtype=torch.float64)


def _weights(image: torch.Tensor, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(image.shape, generator=g, dtype=torch.float64)


def _diffusers_tiled(b, x0: torch.Tensor, tile: int) -> torch.Tensor:
    """The image through diffusers' ``AutoencoderKL.tiled_decode`` with tiles of ``tile`` latents."""
    vae = b.vae
    scale = b.image_shape[-1] // b.latent_shape[-1]
    saved = vae.tile_latent_min_size, vae.tile_sample_min_size, vae.tile_overlap_factor
    vae.tile_latent_min_size, vae.tile_sample_min_size, vae.tile_overlap_factor = tile, tile * scale, 0.25
    try:
        return b._image(vae.tiled_decode(b._latents(x0)).sample, x0.dtype)
    finally:
        vae.tile_latent_min_size, vae.tile_sample_min_size, vae.tile_overlap_factor = saved


# latent sides: past the tile both ways, and across one side no longer than a tile (two tiles, the
# second past the stride), no longer than a stride (one tile, kept whole) and shorter than it
SIDES = [(20, 20), (20, 14), (20, 8), (20, 6), (20, 5)]


@pytest.mark.parametrize("family", list(BUILDERS))
def test_the_tiled_image_is_diffusers_tiled_decode_and_not_the_whole_decode(backends, family):
    b = backends[family]
    assert tile_starts(20, TILE) == [0, 6, 12, 18] and tile_starts(8, TILE) == [0, 6]  # stride 6
    for sides in SIDES:
        x0 = _latents(b, (b.latent_shape[0], *sides))
        with torch.no_grad():
            tiled, whole = b.decode(x0, DecodePlan(tile=TILE)), b.decode(x0)
            reference = _diffusers_tiled(b, x0, TILE)
        assert tiled.shape == whole.shape == reference.shape, sides
        torch.testing.assert_close(tiled, reference, rtol=0, atol=1e-12)
        assert (tiled - whole).abs().max() > 1e-4, sides  # approximate: seams, each tile's group norm


PLANS = {"whole batch": DecodePlan(tile=TILE), "slices of 1": DecodePlan(1, tile=TILE),
         "blocks": DecodePlan(0, BLOCKS, tile=TILE), "fine, slices of 1": DecodePlan(1, FINE, tile=TILE)}


@pytest.mark.parametrize("family", list(BUILDERS))
def test_the_tiled_gradient_is_autograds_through_diffusers_tiled_decode(backends, family):
    b = backends[family]
    x = _latents(b).requires_grad_()
    image = _diffusers_tiled(b, x, TILE)
    w = _weights(image)
    reference = torch.autograd.grad((image * w).sum() + (image ** 2).sum(), x)[0]
    assert reference.abs().max() > 0
    for name, plan in PLANS.items():
        x = _latents(b).requires_grad_()
        image = b.decode(x, plan)
        got = torch.autograd.grad((image * w).sum() + (image ** 2).sum(), x)[0]
        err = ((got - reference).abs().max() / reference.abs().max()).item()
        assert err <= 1e-10, (family, name, err)


def test_the_tiled_gradient_holds_on_every_geometry(backends):
    b = backends["sd"]
    for sides in SIDES[1:]:
        x = _latents(b, (b.latent_shape[0], *sides)).requires_grad_()
        image = _diffusers_tiled(b, x, TILE)
        w = _weights(image)
        reference = torch.autograd.grad((image * w).sum(), x)[0]
        x = x.detach().requires_grad_()
        got = torch.autograd.grad((b.decode(x, DecodePlan(1, BLOCKS, tile=TILE)) * w).sum(), x)[0]
        err = ((got - reference).abs().max() / reference.abs().max()).item()
        assert err <= 1e-10, (sides, err)


def test_a_tile_the_image_fits_in_decodes_it_whole_and_exactly(backends):
    b = backends["sd"]
    plan = b.plan_decoder(BATCH, None, tile=max(b.latent_shape[-2:]))
    assert plan.tile == 0
    x0 = _latents(b)
    with torch.no_grad():
        assert torch.equal(b.decode(x0, plan), b.decode(x0))


def test_the_forward_keeps_no_graph_and_the_backward_one_tile_at_a_time(backends):
    b = backends["sd"]
    x = _latents(b).requires_grad_()
    assert _saved(lambda: b.decode(x, DecodePlan(tile=TILE))) == 2  # the latents; the clamp's input
    convs = [c for c in b.vae.decoder.modules() if isinstance(c, torch.nn.Conv2d)]
    widest = {"pixels": 0}

    def hook(module, args):  # what each convolution sees inside the backward pass
        if torch._C._current_graph_task_id() != -1:
            widest["pixels"] = max(widest["pixels"], args[0].shape[0] * args[0].shape[-1] * args[0].shape[-2])
    handles = [c.register_forward_pre_hook(hook) for c in convs]
    try:
        image = b.decode(x, DecodePlan(1, tile=TILE))
        torch.autograd.grad(image.sum(), x)
    finally:
        for h in handles:
            h.remove()
    scale = b.image_shape[-1] // b.latent_shape[-1]
    assert widest["pixels"] == (TILE * scale) ** 2  # one sample's tile at the decoder's widest
    whole, tile = b.decoder_graph(), b.decoder_graph(TILE)
    assert tile.plain < 0.3 * whole.plain and tile.at(FINE) < tile.plain


def test_bad_tiles_and_budgets_below_one_tile_are_refused(backends):
    b = backends["sd"]
    for bad in (4, 6, 10):
        with pytest.raises(InvalidArgument, match="decoder_tile"):
            b.plan_decoder(BATCH, None, tile=bad)
    graph = b.decoder_graph(TILE)
    fits = b.plan_decoder(BATCH, graph.at(FINE) * ALLOCATOR_SLACK, tile=TILE)
    assert (fits.tile, fits.slice_size, fits.checkpointing) == (TILE, 1, FINE)
    roomy = b.plan_decoder(BATCH, 1 << 40, tile=TILE)
    assert (roomy.tile, roomy.slice_size, roomy.checkpointing) == (TILE, 0, NONE)
    with pytest.raises(ResourceExhausted, match="tile"):
        b.plan_decoder(BATCH, graph.at(FINE) * ALLOCATOR_SLACK - 1, tile=TILE)
