"""A result that cannot fit in one gRPC message is refused before the work, not after it."""

from __future__ import annotations

import math

from ..errors import ResourceExhausted
from ._generation import Prepared

__all__ = ["reply_bytes", "check_reply_size", "wire_itemsize"]


def wire_itemsize(prep: Prepared) -> int:
    """Bytes per number of a result on the wire: half precision travels as float32."""
    return max(4, prep.x_T.element_size())


def reply_bytes(prep: Prepared, *, images: bool = False, pixels: bool = False, latents: int = 1,
                extra_elements: int = 0) -> int:
    """An upper estimate of a result's size: ``latents`` latent tensors per sample (x_0, x_T),
    PNGs (at most the raw 8-bit pixels plus headers), float pixels, and ``extra_elements`` more
    numbers (gradients) in the working dtype."""
    item = wire_itemsize(prep)
    latent = math.prod(prep.backend.latent_shape)
    image = math.prod(prep.backend.image_shape)
    per_sample = latents * latent * item + (image + 256 if images else 0) + (image * 4 if pixels else 0)
    return prep.batch * per_sample + extra_elements * item + 4096


def check_reply_size(limits, estimate: int, what: str) -> None:
    if estimate > limits.max_message_bytes:
        raise ResourceExhausted(
            f"the {what} would be about {estimate / 2**20:.1f} MiB, over the server's message limit "
            f"of {limits.max_message_bytes / 2**20:.1f} MiB: ask for fewer samples or outputs"
            " (weight gradients: as an artifact)")
