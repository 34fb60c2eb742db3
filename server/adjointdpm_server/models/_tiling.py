"""Tiled VAE decoding, approximate and only on request (docs/design.md §2.4.4).

diffusers' tiled decoding (``AutoencoderKL.tiled_decode``), the same tiles and the same blend:
the latents cut into overlapping tiles of ``tile`` pixels a side (stride ¾ of a tile), each
decoded alone, the seams blended linearly over a quarter tile. Each tile has its own group-norm
statistics and sees no context past its edge, so the image and its gradient differ from the whole
decode: a request asks for it (``decoder_tile``), never the planner. What it buys is a decoder
graph of one tile's, whatever the image's size; the image-sized buffers of the blend remain.

``TiledDecode`` is one autograd.Function: its forward decodes tile by tile with no graph and
blends; its backward takes the blend's VJP (linear: the tiles' values do not matter) and then
recomputes one tile at a time — ``slice_size`` samples of it, at the plan's checkpointing level —
adding each tile's latent gradient where the tile lies. Exact for the tiled image: the gradient
is autograd's through diffusers' own ``tiled_decode`` (tests/models/test_decoder_tiling.py).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..errors import InvalidArgument
from ._decoding import DecodePlan, checkpointed_decoder

__all__ = ["TiledDecode", "tile_starts", "check_tile", "OVERLAP", "MIN_TILE"]

OVERLAP = 0.25  # of a tile: diffusers' tile_overlap_factor
MIN_TILE = 8  # latent pixels: a smaller tile's group norm sees next to nothing


def check_tile(tile: int) -> None:
    """A tile diffusers' geometry keeps whole: its stride (¾ tile) and blend (¼) in whole pixels."""
    if tile % 4 or tile < MIN_TILE:
        raise InvalidArgument(f"decoder_tile must be 0 (exact) or a multiple of 4 of at least "
                              f"{MIN_TILE} latent pixels; got {tile}")


def tile_starts(size: int, tile: int) -> list[int]:
    """Where tiles start along an axis of ``size`` latent pixels: diffusers' stride of ¾ tile up
    to the end (the last tiles may be shorter; an axis no longer than a stride is one tile)."""
    return list(range(0, size, int(tile * (1 - OVERLAP))))


def _blend(vae, rows: list[list[torch.Tensor]], tile_px: int) -> torch.Tensor:
    """The decoded tiles blended into one image: diffusers' ``tiled_decode`` after its decodes
    (each tile blended in place with the one above and the one to its left, then cut to the
    stride)."""
    extent = int(tile_px * OVERLAP)
    keep = tile_px - extent
    out_rows = []
    for i, row in enumerate(rows):
        out_row = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = vae.blend_v(rows[i - 1][j], tile, extent)
            if j > 0:
                tile = vae.blend_h(row[j - 1], tile, extent)
            out_row.append(tile[:, :, :keep, :keep])
        out_rows.append(torch.cat(out_row, dim=3))
    return torch.cat(out_rows, dim=2)


class TiledDecode(torch.autograd.Function):
    """``vae``'s tiled decode of ``latents`` (already scaled for the VAE) in tiles of ``plan.tile``
    latent pixels: no graph in the forward; the backward recomputes tile by tile."""

    @staticmethod
    def forward(ctx, latents, vae, plan: DecodePlan):
        ctx.vae, ctx.plan = vae, plan
        ctx.save_for_backward(latents)
        step = plan.slice_size or len(latents)
        rows = [[torch.cat([vae.decode(z[k:k + step]).sample for k in range(0, len(z), step)]) for z in row]
                for row in _tiles(latents, plan.tile)]
        ctx.shapes = [[t.shape for t in row] for row in rows]
        ctx.scale = rows[0][0].shape[-1] // min(plan.tile, latents.shape[-1])  # pixels per latent
        return _blend(vae, rows, plan.tile * ctx.scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (latents,) = ctx.saved_tensors
        vae, plan = ctx.vae, ctx.plan
        leaves = [[grad.new_zeros(shape).requires_grad_() for shape in row] for row in ctx.shapes]
        with torch.enable_grad():  # the blend is linear: its VJP needs no tile's values
            image = _blend(vae, [[t.clone() for t in row] for row in leaves], plan.tile * ctx.scale)
            tile_grads = list(torch.autograd.grad(image, [t for row in leaves for t in row], grad))
        del image, leaves
        out = torch.zeros_like(latents)
        step = plan.slice_size or len(latents)
        starts = [(i, j) for i in tile_starts(latents.shape[2], plan.tile)
                  for j in tile_starts(latents.shape[3], plan.tile)]
        with checkpointed_decoder(plan.checkpointing):
            for n, (i, j) in enumerate(starts):
                g, tile_grads[n] = tile_grads[n], None  # each tile's share freed once used
                window = (slice(None), slice(None), slice(i, i + plan.tile), slice(j, j + plan.tile))
                for k in range(0, len(latents), step):
                    z = latents[k:k + step][window].detach().requires_grad_()
                    with torch.enable_grad():
                        decoded = vae.decode(z).sample
                    out[k:k + step][window] += torch.autograd.grad(decoded, z, g[k:k + step])[0]
                    del decoded
        return out, None, None


def _tiles(latents: torch.Tensor, tile: int) -> list[list[torch.Tensor]]:
    return [[latents[:, :, i:i + tile, j:j + tile] for j in tile_starts(latents.shape[3], tile)]
            for i in tile_starts(latents.shape[2], tile)]
