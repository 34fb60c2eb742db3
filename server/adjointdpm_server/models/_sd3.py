"""`diffusers` SD3-type: an ``SD3Transformer2DModel`` predicting the rectified-flow velocity, with
CLIP-L, CLIP-G and an optional T5 (docs/design.md §4.2).

``cond`` packs what ``StableDiffusion3Pipeline.encode_prompt`` returns (models/_packing.py): the
rows of CLIP-L ⊕ CLIP-G penultimate hidden states, zero-padded to the joint width, then the T5
rows (zeros when the directory has no T5, as the pipeline makes them), then the pooled CLIP-L ⊕
CLIP-G projections. The path is the scheduler's shifted rectified flow (core/_flow_schedule.py);
the network's timestep is 1000·σ_t.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..core import BlockCheckpointing, FlowSchedule, enable_block_checkpointing
from ._latent import LatentDiffusionBackend, class_for, component, load_flow_schedule
from ._packing import TokensAndVector
from ._text import TextEncoder

__all__ = ["SD3Backend", "SD3Velocity"]

PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class SD3Velocity(nn.Module, BlockCheckpointing):
    """``eps_fn(x, t, cond)`` → the velocity ``dx/dσ`` of an SD3 transformer at time t."""

    def __init__(self, transformer, layout: TokensAndVector, schedule: FlowSchedule):
        super().__init__()
        self.transformer = transformer
        enable_block_checkpointing(transformer)  # off until auto's plan needs it (core/_blocks.py)
        self.layout = layout
        self.schedule = schedule

    def forward(self, x, t, cond):
        tokens, pooled = self.layout.unpack(cond)
        timestep = 1000.0 * self.schedule.sigma(t)
        return self.transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=tokens,
                                pooled_projections=pooled).sample


class SD3Backend(LatentDiffusionBackend):
    """SD3-type model from a local diffusers directory (``StableDiffusion3Pipeline``).

    ``max_sequence_length`` is T5's token count (the pipeline's default, 256). A learned token
    enters CLIP-L, CLIP-G and T5 (when present), in that order.
    """

    name = "diffusers"
    family = "sd3"
    prediction = "velocity"
    default_grid = "time"
    default_steps = 28
    default_guidance = 7.0
    lora_targets = LORA_TARGETS
    parts = PARTS
    title = "SD3"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str = torch.float32, *, height: int | None = None,
                 width: int | None = None, variant: str | None = None, max_sequence_length: int = 256):
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        device, dtype = self._open(path, device, dtype, variant)
        path = self.path
        self.transformer = self._part(SD3Transformer2DModel, "transformer", dtype)
        self.vae = self._vae(AutoencoderKL, dtype)
        clips = [self._part(CLIPTextModelWithProjection, sub) for sub in ("text_encoder", "text_encoder_2")]
        tokenizers = [self._tokenizer(CLIPTokenizer, sub) for sub in ("tokenizer", "tokenizer_2")]
        self.clip_length = int(tokenizers[0].model_max_length)  # the pipeline pads both to this
        encoders = [TextEncoder(tok, enc, self.clip_length) for tok, enc in zip(tokenizers, clips)]
        self.has_t5 = component(path, "text_encoder_3") is not None and (path / "text_encoder_3").is_dir()
        if self.has_t5:
            t5 = self._part(class_for(path, "text_encoder_3", "T5EncoderModel"), "text_encoder_3")
            tokenizer = self._tokenizer(class_for(path, "tokenizer_3", "T5TokenizerFast"), "tokenizer_3")
            encoders.append(TextEncoder(tokenizer, t5, max_sequence_length))
        for encoder in encoders:
            encoder.encoder.to(dtype=dtype)
        self._freeze(device, self.transformer, self.vae, *(e.encoder for e in encoders))
        self.text_encoders = encoders
        self.max_sequence_length = int(max_sequence_length)

        config = self.transformer.config
        f = self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        height, width = self._image_size(config.sample_size * f, height, width, f * config.patch_size)
        self.latent_shape = (config.in_channels, height // f, width // f)
        self.image_shape = (self.vae.config.out_channels, height, width)
        seq_len = (height // f // config.patch_size) * (width // f // config.patch_size)
        self.schedule = load_flow_schedule(path, seq_len)

        self.joint_width = config.joint_attention_dim
        clip_width = sum(c.config.hidden_size for c in clips)
        pooled = sum(c.config.projection_dim for c in clips)
        if clip_width > self.joint_width or pooled != config.pooled_projection_dim:
            raise ValueError(f"the CLIP encoders give {clip_width} features and {pooled} pooled; the "
                             f"transformer takes at most {self.joint_width} and exactly "
                             f"{config.pooled_projection_dim}")
        if self.has_t5 and encoders[2].encoder.config.d_model != self.joint_width:
            raise ValueError(f"T5 gives {encoders[2].encoder.config.d_model} features; the transformer "
                             f"attends to {self.joint_width}")
        self.layout = TokensAndVector(self.clip_length + self.max_sequence_length, self.joint_width, pooled)
        self.eps_fn = SD3Velocity(self.transformer, self.layout, self.schedule)

    @property
    def cond_shape(self) -> tuple[int, ...]:
        return self.layout.shape

    def _embed(self, texts: list[str], token=None) -> torch.Tensor:
        """``StableDiffusion3Pipeline.encode_prompt`` (no clip_skip), packed."""
        pieces = self._token_pieces(token)
        hidden, pooled = [], []
        for encoder, piece in zip(self.text_encoders[:2], pieces):
            out = self._run(encoder, texts, piece, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, self.joint_width - clip.shape[-1]))
        if self.has_t5:
            t5 = self._run(self.text_encoders[2], texts, pieces[2])[0]
        else:
            t5 = clip.new_zeros((len(texts), self.max_sequence_length, self.joint_width))
        return self.layout.pack(torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1))
