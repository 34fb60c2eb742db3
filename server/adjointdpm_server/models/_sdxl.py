"""`diffusers` SDXL: two CLIP text encoders, pooled embeddings and size micro-conditioning
(docs/design.md §4.2). No refiner: the base model alone generates.

``cond`` packs what ``StableDiffusionXLPipeline.encode_prompt`` returns (models/_packing.py):
the penultimate hidden states of CLIP-L and CLIP-G side by side, (L, D₁ + D₂), then CLIP-G's
projected pooled embedding in the rows after. The added time ids (original size, crop, target
size) are fixed by the backend's image size, as the pipeline's defaults make them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..core import BlockCheckpointing, enable_block_checkpointing
from ._diffusers import LORA_TARGETS
from ._latent import LatentDiffusionBackend, load_vp_schedule
from ._packing import TokensAndVector
from ._text import TextEncoder

__all__ = ["SDXLBackend", "SDXLEps"]

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


class SDXLEps(nn.Module, BlockCheckpointing):
    """``eps_fn(x, t, cond)`` around an SDXL ``UNet2DConditionModel`` (``text_time`` added
    conditioning): ``cond`` is unpacked into the token embeddings and the pooled one."""

    def __init__(self, unet, layout: TokensAndVector, time_ids: torch.Tensor):
        super().__init__()
        self.unet = unet
        enable_block_checkpointing(unet)  # off until auto's plan needs it (core/_blocks.py)
        self.layout = layout
        self.register_buffer("time_ids", time_ids, persistent=False)

    def forward(self, x, t, cond):
        tokens, pooled = self.layout.unpack(cond)
        time_ids = self.time_ids.to(x.dtype).expand(x.shape[0], -1)
        return self.unet(x, t, encoder_hidden_states=tokens,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


class SDXLBackend(LatentDiffusionBackend):
    """SDXL base from a local diffusers directory (``StableDiffusionXLPipeline.save_pretrained``).

    ``device``/``dtype``/``height``/``width``/``variant`` as for Stable Diffusion. An empty
    negative prompt is all zeros when ``model_index.json`` sets ``force_zeros_for_empty_prompt``
    (as SDXL base does), else the embedding of ``""``.
    """

    name = "diffusers"
    family = "sdxl"
    default_steps = 20
    default_guidance = 5.0
    lora_targets = LORA_TARGETS
    parts = PARTS
    title = "SDXL"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str = torch.float32, *, height: int | None = None,
                 width: int | None = None, variant: str | None = None):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        device, dtype = self._open(path, device, dtype, variant)
        path = self.path
        self.unet = self._part(UNet2DConditionModel, "unet", dtype)
        self.vae = self._vae(AutoencoderKL, dtype)
        encoders = [self._part(CLIPTextModel, "text_encoder"),
                    self._part(CLIPTextModelWithProjection, "text_encoder_2")]
        tokenizers = [self._tokenizer(CLIPTokenizer, sub) for sub in ("tokenizer", "tokenizer_2")]
        for encoder in encoders:
            encoder.to(dtype=dtype)  # transformers models load in float32
        self._freeze(device, self.unet, self.vae, *encoders)
        self.text_encoders = [TextEncoder(tok, enc, min(int(tok.model_max_length),
                                                        enc.config.max_position_embeddings))
                              for tok, enc in zip(tokenizers, encoders)]
        self.schedule, self.prediction = load_vp_schedule(path)
        index = json.loads((path / "model_index.json").read_text())
        self.force_zeros_for_empty_prompt = bool(index.get("force_zeros_for_empty_prompt", True))

        config = self.unet.config
        if config.addition_embed_type != "text_time":
            raise ValueError(f"an SDXL UNet has addition_embed_type 'text_time'; this one has "
                             f"{config.addition_embed_type!r}")
        f = self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        height, width = self._image_size(config.sample_size * f, height, width, f)
        self.latent_shape = (config.in_channels, height // f, width // f)
        self.image_shape = (self.vae.config.out_channels, height, width)

        lengths = {e.max_length for e in self.text_encoders}
        if len(lengths) != 1:
            raise ValueError(f"SDXL's two tokenizers must pad to one length; got {sorted(lengths)}")
        widths = sum(e.encoder.config.hidden_size for e in self.text_encoders)
        pooled = encoders[1].config.projection_dim
        if widths != config.cross_attention_dim:
            raise ValueError(f"the text encoders give {widths} features; the UNet attends to "
                             f"{config.cross_attention_dim}")
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float64)
        expected = self.unet.add_embedding.linear_1.in_features
        if config.addition_time_embed_dim * time_ids.shape[1] + pooled != expected:
            raise ValueError(f"the UNet's added embedding takes {expected} features; the time ids "
                             f"and CLIP-G's pooled embedding give "
                             f"{config.addition_time_embed_dim * time_ids.shape[1] + pooled}")
        self.layout = TokensAndVector(lengths.pop(), widths, pooled)
        self.eps_fn = SDXLEps(self.unet, self.layout, time_ids.to(device, dtype))

    @property
    def cond_shape(self) -> tuple[int, ...]:
        return self.layout.shape

    def _embed(self, texts: list[str], token=None) -> torch.Tensor:
        """Penultimate hidden states of both encoders side by side, and CLIP-G's pooled output
        (``StableDiffusionXLPipeline.encode_prompt`` without clip_skip), packed."""
        hidden, pooled = [], None
        for encoder, piece in zip(self.text_encoders, self._token_pieces(token)):
            out = self._run(encoder, texts, piece, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's projected pooled embedding
        return self.layout.pack(torch.cat(hidden, dim=-1), pooled)

    def _uncond(self, batch: int, negative_prompt) -> torch.Tensor:
        if negative_prompt is None and self.force_zeros_for_empty_prompt:
            return torch.zeros((batch, *self.cond_shape), dtype=self.dtype, device=self.device)
        return super()._uncond(batch, negative_prompt)
