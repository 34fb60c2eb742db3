"""`diffusers`: Stable Diffusion 1.x/2.x from a local diffusers-format directory (docs/design.md §2, §4).

The directory holds ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and ``scheduler/`` as
``StableDiffusionPipeline.save_pretrained`` writes them. Every part is read with
``local_files_only=True`` after checking that it exists, so nothing is ever fetched from a hub.

What is differentiated, and how (AdjointDPM paper §3.1: gradients w.r.t. ``x_T``, the
conditioning and the weights; docs/design.md §2 "Stable Diffusion specifics"):

- ``x_T`` (paper §4.1.2, security auditing): ``sample(backend.eps_fn, x_T.requires_grad_(), ...)``.
- the prompt embedding: ``c = backend.encode(...)``; ``c.cond.requires_grad_()``.
- one new token's input embedding (paper Appendix A, textual inversion), *through* the CLIP
  text encoder: :meth:`StableDiffusionBackend.encode_with_token`.
- UNet weights (paper §4.2, stylization), as LoRA: ``models._adapters.with_lora(backend.eps_fn,
  rank)`` gives an ``eps_fn`` of its own (the same adapter every family and the service use).

A v-prediction UNet (SD 2.x 768-v) is not wrapped: the backend declares ``prediction = "v"``
(from the scheduler config, as SDXL does) and the sampler turns v into ε inside the field
(core/_prediction.py), so ``sample(..., prediction=backend.prediction)``.

The loss is usually on the decoded image, so ``∂L/∂x_0`` is the VJP of the VAE decoder:
``loss(backend.decode(x0))``. A loss on latents simply does not call :meth:`decode` (and skips
the decoder's cost in the forward and the backward pass).

The resident model (UNet, VAE, text encoder, tokenizer) is frozen and never modified: fine-tunes
and inversions work on copies, adapters or substituted activations (docs/design.md §4, Operations).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..core import BlockCheckpointing, enable_block_checkpointing
from ._latent import LatentDiffusionBackend, load_vp_schedule
from ._text import TextEncoder

__all__ = ["StableDiffusionBackend", "TextConditionalEps"]

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class TextConditionalEps(nn.Module, BlockCheckpointing):
    """``eps_fn(x, t, cond)`` around a diffusers ``UNet2DConditionModel``: the UNet's output, ε or
    v as the backend's ``prediction`` says (the sampler converts; core/_prediction.py).

    An ``nn.Module`` so that ``sample`` differentiates whichever UNet weights require grad.
    """

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        enable_block_checkpointing(unet)  # off until auto's plan needs it (core/_blocks.py)

    def forward(self, x, t, cond):
        return self.unet(x, t, encoder_hidden_states=cond).sample


class StableDiffusionBackend(LatentDiffusionBackend):
    """Stable Diffusion 1.x/2.x, resident and frozen, read from a local diffusers directory.

    ``device``/``dtype``: float16 and bfloat16 need CUDA; on the CPU only float32 (SD's training
    precision) or float64 (exact gradient comparisons in tests) are accepted. ``height``/``width``
    override the native image size (``unet.config.sample_size × vae_scale_factor``); they must be
    multiples of the VAE scale factor (8 for SD). ``variant`` picks weight files such as
    ``*.fp16.safetensors``.
    """

    name = "diffusers"
    family = "sd"
    default_steps = 20
    default_guidance = 7.5
    lora_targets = LORA_TARGETS
    parts = PARTS
    title = "Stable Diffusion"

    @property
    def cond_shape(self) -> tuple[int, ...]:
        return (self.max_length, self.text_encoder.config.hidden_size)

    def __init__(self, path: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str = torch.float32, *, height: int | None = None,
                 width: int | None = None, variant: str | None = None):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        device, dtype = self._open(path, device, dtype, variant)
        unet = self._part(UNet2DConditionModel, "unet", dtype)
        self.vae = self._vae(AutoencoderKL, dtype)
        self.text_encoder = self._part(CLIPTextModel, "text_encoder")
        self.tokenizer = self._tokenizer(CLIPTokenizer, "tokenizer")
        self.schedule, self.prediction = load_vp_schedule(self.path)

        self.text_encoder.to(dtype=dtype)  # diffusers models were loaded in dtype already
        self._freeze(device, unet, self.vae, self.text_encoder)
        self.unet = unet
        self.eps_fn = TextConditionalEps(unet)

        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        f = self.vae_scale_factor
        height, width = self._image_size(unet.config.sample_size * f, height, width, f)
        self.latent_shape = (unet.config.in_channels, height // f, width // f)
        self.image_shape = (self.vae.config.out_channels, height, width)
        self.max_length = min(int(self.tokenizer.model_max_length),
                              self.text_encoder.config.max_position_embeddings)
        self.text_encoders = [TextEncoder(self.tokenizer, self.text_encoder, self.max_length)]

    def _embed(self, texts: list[str], token=None) -> torch.Tensor:
        """CLIP's last hidden state (SD's ``cond``)."""
        (piece,) = self._token_pieces(token)
        return self._run(self.text_encoders[0], texts, piece).last_hidden_state
