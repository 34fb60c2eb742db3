"""Tiny SDXL, SD3 and FLUX.1 pipelines built from config with seeded random weights (no downloads).

Like ``tiny_sd.build_tiny_sd``, each builder writes a complete diffusers-format directory that the
stock pipeline class loads with ``from_pretrained(path, local_files_only=True)``: the parts are
made in memory, put into the real pipeline class and written with its own ``save_pretrained``, so
``model_index.json`` names the pipeline and every component exactly as diffusers does (missing
optional parts as ``[null, null]``). Tokenizers are built offline: the CLIP ones from
``tiny_sd.tiny_vocab()`` (16 tokens), the T5 one as a small Unigram vocabulary (``t5_vocab()``) in
``transformers.T5Tokenizer`` (32 tokens, ``</s>`` appended, ``<pad>`` = 0).

Sizes, shared by all three (VAE: two blocks, scale factor 2):
  image 3×16×16 (``IMAGE_SIZE``), latent 4×8×8 (``LATENT_CHANNELS`` × ``LATENT_SIZE``²).
- ``build_tiny_sdxl``: UNet (16, 32) with ``text_time`` added conditioning; CLIP 32 (CLIPTextModel)
  + CLIP 48 (with projection 48) → cross-attention 80, add-embedding input 6·8 + 48 = 96.
- ``build_tiny_sd3``: SD3Transformer2DModel, patch 2 → 4×4 = 16 image tokens, inner dim 32; two
  CLIPs with projection (32 + 48 → pooled 80), T5 d_model 96 (joint attention dim; the CLIP states,
  80 wide, are zero-padded to it as in the real SD3), optional (``t5=False``: null in the index).
- ``build_tiny_flux``: FluxTransformer2DModel on 2×2-packed latents (16 channels, 4×4 = 16 tokens),
  guidance embedding; CLIP 32 (pooled, CLIPTextModel) + T5 96.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tiny_sd import BOS, EOS, HIDDEN, MAX_LENGTH, WORDS, tiny_vocab

__all__ = [
    "IMAGE_SIZE", "LATENT_SIZE", "LATENT_CHANNELS", "VAE_SCALE_FACTOR", "CLIP_MAX_LENGTH",
    "CLIP_HIDDEN", "CLIP_2_HIDDEN", "T5_HIDDEN", "T5_MAX_LENGTH", "T5_PAD", "T5_EOS", "T5_UNK",
    "SDXL_CROSS_ATTENTION_DIM", "SDXL_ADDITION_TIME_EMBED_DIM", "SDXL_ADD_EMBED_INPUT_DIM",
    "SD3_PATCH_SIZE", "SD3_POOLED_DIM", "SD3_IMAGE_SEQ_LEN", "FLUX_PACKED_CHANNELS",
    "FLUX_IMAGE_SEQ_LEN", "t5_vocab", "clip_tokenizer", "t5_tokenizer",
    "build_tiny_sdxl", "build_tiny_sd3", "build_tiny_flux",
]

IMAGE_SIZE = 16           # pixels, height = width
VAE_SCALE_FACTOR = 2      # two VAE blocks
LATENT_SIZE = IMAGE_SIZE // VAE_SCALE_FACTOR
LATENT_CHANNELS = 4
CLIP_MAX_LENGTH = MAX_LENGTH   # 16: the CLIP tokenizers' model_max_length and position embeddings
CLIP_HIDDEN = HIDDEN           # 32: the first CLIP text encoder (CLIP-L's place)
CLIP_2_HIDDEN = 48             # the second CLIP text encoder (OpenCLIP-bigG's place); projection too
T5_HIDDEN = 96                 # T5 d_model
T5_MAX_LENGTH = 32             # the T5 tokenizer's model_max_length
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"   # ids 0, 1, 2 as in T5

SDXL_CROSS_ATTENTION_DIM = CLIP_HIDDEN + CLIP_2_HIDDEN             # 80
SDXL_ADDITION_TIME_EMBED_DIM = 8
SDXL_ADD_EMBED_INPUT_DIM = 6 * SDXL_ADDITION_TIME_EMBED_DIM + CLIP_2_HIDDEN   # 96
SD3_PATCH_SIZE = 2
SD3_POOLED_DIM = CLIP_HIDDEN + CLIP_2_HIDDEN                       # 80
SD3_IMAGE_SEQ_LEN = (LATENT_SIZE // SD3_PATCH_SIZE) ** 2          # 16
FLUX_PACKED_CHANNELS = LATENT_CHANNELS * 4                         # 16: 2×2 packing
FLUX_IMAGE_SEQ_LEN = (LATENT_SIZE // 2) ** 2                       # 16

_T5_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!-'"


def t5_vocab() -> list[tuple[str, float]]:
    """Unigram pieces and log-probabilities in T5's layout: ``<pad>``, ``</s>``, ``<unk>`` first
    (ids 0, 1, 2), then ``▁`` and ``▁``-prefixed ``WORDS`` (one piece each), then single characters
    (with and without ``▁``) so any lower-case ASCII word still tokenizes without ``<unk>``."""
    pieces = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), ("▁", -3.0)]
    pieces += [("▁" + w, -2.0) for w in WORDS]
    pieces += [("▁" + c, -6.0) for c in _T5_CHARS]
    pieces += [(c, -5.0) for c in _T5_CHARS]
    return pieces


def clip_tokenizer():
    """The offline CLIP BPE tokenizer of ``tiny_sd`` (``tiny_vocab()``, model_max_length 16) as a
    ``transformers.CLIPTokenizer``; it encodes exactly as the one ``build_tiny_sd`` writes."""
    from transformers import CLIPTokenizer

    vocab, merges = tiny_vocab()
    return CLIPTokenizer(
        vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=CLIP_MAX_LENGTH,
        bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
    )


def t5_tokenizer():
    """A T5 tokenizer (``transformers.T5Tokenizer``, the tokenizers-backed class that
    ``T5TokenizerFast`` names in transformers 5) on ``t5_vocab()``, no sentinel ids,
    model_max_length ``T5_MAX_LENGTH``; it appends ``</s>`` and pads with ``<pad>``."""
    from transformers import T5Tokenizer

    return T5Tokenizer(
        vocab=t5_vocab(), eos_token=T5_EOS, unk_token=T5_UNK, pad_token=T5_PAD, extra_ids=0,
        model_max_length=T5_MAX_LENGTH,
    )


def _clip_config(vocab: dict[str, int], hidden: int, *, projection: int | None = None,
                 act: str = "quick_gelu"):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act=act, projection_dim=projection or hidden,
        bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS],
    )


def _t5_encoder(vocab_size: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=T5_HIDDEN, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )).eval()


def _vae(seed: int, **kwargs):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=8, sample_size=IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        **kwargs,
    )


def _save(pipe, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path)
    return path


def build_tiny_sdxl(path, *, seed: int = 0) -> Path:
    """Save a tiny ``StableDiffusionXLPipeline`` under ``path`` (image 16×16, latent 4×8×8): UNet
    with ``text_time`` conditioning, CLIPTextModel 32 + CLIPTextModelWithProjection 48, SDXL's
    EulerDiscreteScheduler config, ``force_zeros_for_empty_prompt`` true. Returns the path."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    vocab, _ = tiny_vocab()

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config(vocab, CLIP_HIDDEN)).eval()
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(
        _clip_config(vocab, CLIP_2_HIDDEN, projection=CLIP_2_HIDDEN, act="gelu")).eval()

    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=1,
        cross_attention_dim=SDXL_CROSS_ATTENTION_DIM, addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=SDXL_ADD_EMBED_INPUT_DIM,
    )
    vae = _vae(seed + 3, scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False,
        steps_offset=1, timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    return _save(pipe, path)


def build_tiny_sd3(path, *, seed: int = 0, t5: bool = True) -> Path:
    """Save a tiny ``StableDiffusion3Pipeline`` under ``path`` (image 16×16, latent 4×8×8, patch 2):
    SD3Transformer2DModel (1 layer, 4 heads × 8), two CLIPTextModelWithProjection (32, 48), the
    T5 encoder (d_model 96) and tokenizer unless ``t5=False`` (then ``text_encoder_3`` and
    ``tokenizer_3`` are ``[null, null]`` in the index), FlowMatchEulerDiscreteScheduler(shift=3).
    Returns the path."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    path = Path(path)
    vocab, _ = tiny_vocab()

    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(_clip_config(vocab, CLIP_HIDDEN)).eval()
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(
        _clip_config(vocab, CLIP_2_HIDDEN, projection=CLIP_2_HIDDEN, act="gelu")).eval()
    tokenizer_3 = t5_tokenizer() if t5 else None
    text_encoder_3 = _t5_encoder(len(tokenizer_3), seed + 2) if t5 else None

    torch.manual_seed(seed + 3)
    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SIZE, patch_size=SD3_PATCH_SIZE, in_channels=LATENT_CHANNELS,
        num_layers=1, attention_head_dim=8, num_attention_heads=4, joint_attention_dim=T5_HIDDEN,
        caption_projection_dim=32, pooled_projection_dim=SD3_POOLED_DIM,
        out_channels=LATENT_CHANNELS, pos_embed_max_size=32,
    )
    vae = _vae(seed + 4, use_quant_conv=False, use_post_quant_conv=False,
               shift_factor=0.0609, scaling_factor=1.5035)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=text_encoder, tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder_2, tokenizer_2=clip_tokenizer(),
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )
    return _save(pipe, path)


def build_tiny_flux(path, *, seed: int = 0) -> Path:
    """Save a tiny ``FluxPipeline`` under ``path`` (image 16×16, latent 4×8×8, packed 2×2 into 16
    tokens of 16 channels): FluxTransformer2DModel (1 double + 1 single block, 2 heads × 16, rope
    axes 4+6+6, guidance embedding), CLIPTextModel 32 (pooled), T5 encoder (d_model 96) and
    tokenizer, FLUX.1's dynamically shifted FlowMatchEulerDiscreteScheduler. Returns the path."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    path = Path(path)
    vocab, _ = tiny_vocab()

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config(vocab, CLIP_HIDDEN)).eval()
    tokenizer_2 = t5_tokenizer()
    text_encoder_2 = _t5_encoder(len(tokenizer_2), seed + 1)

    torch.manual_seed(seed + 2)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=FLUX_PACKED_CHANNELS, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_HIDDEN,
        pooled_projection_dim=CLIP_HIDDEN, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    )
    vae = _vae(seed + 3, use_quant_conv=False, use_post_quant_conv=False,
               shift_factor=0.1159, scaling_factor=0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=text_encoder, tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
    )
    return _save(pipe, path)
