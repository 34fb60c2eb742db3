"""A tiny Stable Diffusion pipeline built from config with seeded random weights (no downloads).

``build_tiny_sd(path)`` writes the five parts a real SD 1.x directory has, in the same on-disk
format (``unet/``, ``vae/``, ``text_encoder/`` as ``config.json`` + safetensors; ``tokenizer/`` as
CLIP's ``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json``; ``scheduler/`` as SD 1.5's
``PNDMScheduler`` config), so ``StableDiffusionBackend(path)`` exercises its real loading code.
Sizes: latent 4×8×8, image 3×16×16 (VAE scale factor 2), text 16 tokens × 32.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

MAX_LENGTH = 16
HIDDEN = 32
WORDS = ("a", "photo", "of", "cat", "dog", "painting", "in", "the", "style")
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789<>*.,!-"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def tiny_vocab() -> tuple[dict[str, int], list[str]]:
    """CLIP-style BPE vocab and merges: single characters (with and without ``</w>``), the
    ``WORDS`` (reachable by left-to-right merges, every intermediate piece in the vocab too) and
    the two special tokens, ``<|endoftext|>`` last as in CLIP (it is also unk and pad)."""
    tokens = list(dict.fromkeys([*CHARS, *(c + "</w>" for c in CHARS)]))
    merges = []
    for word in WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merge = f"{left} {right}"
            if merge not in merges:
                merges.append(merge)
            left += right
            if left not in tokens:
                tokens.append(left)
    tokens += [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_tiny_sd(path, *, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Build and save the tiny pipeline in diffusers format under ``path``; returns the path."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    vocab, merges = tiny_vocab()

    tok_dir = path / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "do_lower_case": True,
        "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS,
    }))
    (tok_dir / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS,
    }))

    torch.manual_seed(seed)
    CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu",
        bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS],
    )).eval().save_pretrained(path / "text_encoder")

    torch.manual_seed(seed + 1)
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=HIDDEN,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).save_pretrained(path / "unet")

    torch.manual_seed(seed + 2)
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=8, sample_size=16,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).save_pretrained(path / "vae")

    PNDMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    ).save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
    }))
    return path


def build_tiny_clip(path, sd_path) -> Path:
    """A tiny CLIP (text + vision, 16×16 images) sharing the tiny SD's tokenizer, for the
    ``clip_similarity`` loss; saved under ``path`` as ``CLIPModel.save_pretrained`` does."""
    from transformers import CLIPConfig, CLIPModel

    path, sd_path = Path(path), Path(sd_path)
    torch.manual_seed(3)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(json.loads((sd_path / "tokenizer" / "vocab.json").read_text())),
                         hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=MAX_LENGTH),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=16, patch_size=8),
        projection_dim=16)
    CLIPModel(config).eval().save_pretrained(path)
    for f in (sd_path / "tokenizer").iterdir():
        shutil.copy(f, path / f.name)
    return path
