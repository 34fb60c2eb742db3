"""`diffusers` FLUX-type: a ``FluxTransformer2DModel`` predicting the rectified-flow velocity on
packed 2×2 latent patches, with CLIP-L (pooled) and T5 (tokens) (docs/design.md §4.2).

``x`` stays the VAE's (C, H, W) latent, so noise, losses on latents and decoding look as for every
other family; the network packs and unpacks it, as ``FluxPipeline`` does. ``cond`` packs
(models/_packing.py) the T5 rows, then CLIP-L's pooled output followed by one more entry: the
guidance scale, which guidance-distilled models (``guidance_embeds``, FLUX-dev) take as an input
instead of running CFG. The scale is written there by :meth:`FluxBackend.guide`, so the engine
batches requests with different scales, and ``∂L/∂cond`` includes ∂L/∂guidance.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..core import BlockCheckpointing, FlowSchedule, enable_block_checkpointing
from ._base import Conditioning
from ._latent import LatentDiffusionBackend, class_for, load_flow_schedule
from ._packing import TokensAndVector
from ._text import TextEncoder

__all__ = ["FluxBackend", "FluxVelocity"]

PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H/2 · W/2, 4C): ``FluxPipeline._pack_latents``."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`: ``FluxPipeline._unpack_latents``."""
    b, _, channels = x.shape
    return x.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, channels // 4, h, w)


def image_ids(h: int, w: int) -> torch.Tensor:
    """Rotary position ids of the packed patches: ``FluxPipeline._prepare_latent_image_ids``."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


class FluxVelocity(nn.Module, BlockCheckpointing):
    """``eps_fn(x, t, cond)`` → the velocity ``dx/dσ`` of a FLUX transformer at time t (its
    timestep input is σ_t; it scales by 1000 itself)."""

    def __init__(self, transformer, layout: TokensAndVector, schedule: FlowSchedule, latent_hw):
        super().__init__()
        self.transformer = transformer
        enable_block_checkpointing(transformer)  # off until auto's plan needs it (core/_blocks.py)
        self.layout = layout
        self.schedule = schedule
        self.latent_hw = latent_hw
        self.guided = bool(transformer.config.guidance_embeds)
        self.register_buffer("img_ids", image_ids(*latent_hw), persistent=False)
        self.register_buffer("txt_ids", torch.zeros(layout.tokens, 3), persistent=False)

    def forward(self, x, t, cond):
        tokens, vector = self.layout.unpack(cond)
        out = self.transformer(hidden_states=pack_latents(x), timestep=self.schedule.sigma(t),
                               guidance=vector[:, -1] if self.guided else None,
                               pooled_projections=vector[:, :-1], encoder_hidden_states=tokens,
                               txt_ids=self.txt_ids.to(x.dtype), img_ids=self.img_ids.to(x.dtype)).sample
        return unpack_latents(out, *self.latent_hw)


class FluxBackend(LatentDiffusionBackend):
    """FLUX-type model from a local diffusers directory (``FluxPipeline``).

    Guidance-distilled models (``guidance_embeds``) take the scale as an input (``guidance =
    "embedded"``, default 3.5) and have no negative prompt; the others (FLUX-schnell-like) run
    plain CFG when a scale is given, with the negative prompt's embedding as ``uncond`` (the
    pipeline's "true CFG"). ``max_sequence_length`` is T5's token count (the pipeline's 512).
    """

    name = "diffusers"
    family = "flux"
    prediction = "velocity"
    default_grid = "time"
    default_steps = 28
    lora_targets = LORA_TARGETS
    parts = PARTS
    title = "FLUX"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str = torch.float32, *, height: int | None = None,
                 width: int | None = None, variant: str | None = None, max_sequence_length: int = 512):
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer

        device, dtype = self._open(path, device, dtype, variant)
        path = self.path
        self.transformer = self._part(FluxTransformer2DModel, "transformer", dtype)
        self.vae = self._vae(AutoencoderKL, dtype)
        clip = self._part(CLIPTextModel, "text_encoder")
        clip_tokenizer = self._tokenizer(CLIPTokenizer, "tokenizer")
        t5 = self._part(class_for(path, "text_encoder_2", "T5EncoderModel"), "text_encoder_2")
        t5_tokenizer = self._tokenizer(class_for(path, "tokenizer_2", "T5TokenizerFast"), "tokenizer_2")
        self.text_encoders = [TextEncoder(clip_tokenizer, clip, int(clip_tokenizer.model_max_length)),
                              TextEncoder(t5_tokenizer, t5, max_sequence_length)]
        for encoder in (clip, t5):
            encoder.to(dtype=dtype)
        self._freeze(device, self.transformer, self.vae, clip, t5)

        config = self.transformer.config
        f = self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        height, width = self._image_size(128 * f, height, width, 2 * f)  # FluxPipeline's default size
        h, w = height // f, width // f
        channels = self.vae.config.latent_channels
        if config.in_channels != 4 * channels:
            raise ValueError(f"the transformer takes {config.in_channels} channels per packed patch; "
                             f"the VAE's {channels} latent channels pack to {4 * channels}")
        self.latent_shape = (channels, h, w)
        self.image_shape = (self.vae.config.out_channels, height, width)
        self.schedule = load_flow_schedule(path, (h // 2) * (w // 2))
        if clip.config.hidden_size != config.pooled_projection_dim or t5.config.d_model != config.joint_attention_dim:
            raise ValueError("the text encoders' widths do not fit the transformer's "
                             "pooled_projection_dim and joint_attention_dim")
        self.guidance = "embedded" if config.guidance_embeds else "cfg"
        self.default_guidance = 3.5 if config.guidance_embeds else None
        self.layout = TokensAndVector(int(max_sequence_length), config.joint_attention_dim,
                                      config.pooled_projection_dim + 1)
        self.eps_fn = FluxVelocity(self.transformer, self.layout, self.schedule, (h, w))

    @property
    def cond_shape(self) -> tuple[int, ...]:
        return self.layout.shape

    def _embed(self, texts: list[str], token=None) -> torch.Tensor:
        """``FluxPipeline.encode_prompt``: T5's last hidden state, CLIP-L's pooled output, packed
        with the default guidance scale (see :meth:`guide`)."""
        clip_piece, t5_piece = self._token_pieces(token)
        pooled = self._run(self.text_encoders[0], texts, clip_piece).pooler_output
        tokens = self._run(self.text_encoders[1], texts, t5_piece)[0]
        scale = pooled.new_full((len(texts), 1), self.default_guidance or 0.0)
        return self.layout.pack(tokens, torch.cat([pooled, scale], dim=-1))

    def _uncond(self, batch: int, negative_prompt) -> torch.Tensor | None:
        if self.guidance == "embedded":
            if negative_prompt is not None:
                raise ValueError("this FLUX model takes its guidance scale as an input: it has no "
                                 "negative prompt")
            return None
        return super()._uncond(batch, negative_prompt)

    def guide(self, c: Conditioning, scale: float | None) -> Conditioning:
        """``cond`` with ``scale`` as the guidance input (the default when None)."""
        if self.guidance != "embedded" or c.cond is None:
            return c
        scale = self.default_guidance if scale is None else float(scale)
        tokens, vector = self.layout.unpack(c.cond)
        vector = torch.cat([vector[:, :-1], vector.new_full((vector.shape[0], 1), scale)], dim=-1)
        return Conditioning(self.layout.pack(tokens, vector), c.uncond)
