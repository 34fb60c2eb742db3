"""Tiny reward-model directories built from config with seeded random weights (no downloads), in
the on-disk layouts ``--aesthetic-model-dir`` and ``--preference-model-dir`` read.

- ``build_tiny_aesthetic(path)``: a tiny CLIP vision tower + projection (16×16 images, patch 8,
  projection 16) saved as transformers saves it — ``CLIPVisionModelWithProjection`` (``full=False``)
  or a whole ``CLIPModel`` (``full=True``) — plus LAION's head with random weights
  (``head.safetensors``, ``head_config.json``) and, optionally, ``preprocessor_config.json``;
- ``build_tiny_preference(path)``: a tiny ``CLIPModel`` with tests/models/tiny_sd.py's tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.models.tiny_sd import BOS, EOS, MAX_LENGTH, tiny_vocab

IMAGE_SIZE, PROJECTION = 16, 16
PROCESSOR = {  # CLIPImageProcessor's saved config at the tiny CLIP's image size
    "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": IMAGE_SIZE},
    "resample": 3, "do_center_crop": True, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}


def tiny_clip_config():
    from transformers import CLIPConfig

    vocab, _ = tiny_vocab()
    return CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=MAX_LENGTH,
                         bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=8, projection_dim=PROJECTION),
        projection_dim=PROJECTION)


def write_tokenizer(path: Path) -> None:
    vocab, merges = tiny_vocab()
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "do_lower_case": True,
        "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}))


def build_tiny_preference(path, *, seed: int = 11, processor: bool = True) -> Path:
    from transformers import CLIPModel

    path = Path(path)
    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config()).eval()
    with torch.no_grad():  # a logit scale other than the default, so a formula that drops it fails
        model.logit_scale.fill_(2.0)
    model.save_pretrained(path)
    write_tokenizer(path)
    if processor:
        (path / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
    return path


def build_tiny_aesthetic(path, *, seed: int = 12, full: bool = False, processor: bool = True) -> Path:
    """A CLIP (vision-only unless ``full``) and LAION's head with random weights under ``path``."""
    from safetensors.torch import save_file
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    from adjointdpm_server.losses._aesthetic import HEAD_CONFIG, HEAD_WEIGHTS, AestheticHead

    path = Path(path)
    config = tiny_clip_config()
    torch.manual_seed(seed)
    clip = CLIPModel(config).eval()
    if full:
        clip.save_pretrained(path)
        write_tokenizer(path)
    else:  # the same vision weights, saved as the vision tower with its projection alone
        vision = CLIPVisionModelWithProjection(config.vision_config).eval()
        vision.vision_model.load_state_dict(clip.vision_model.state_dict())
        vision.visual_projection.load_state_dict(clip.visual_projection.state_dict())
        vision.save_pretrained(path)
    torch.manual_seed(seed + 1)
    head = AestheticHead(PROJECTION)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(path / HEAD_WEIGHTS))
    (path / HEAD_CONFIG).write_text(json.dumps({"input_dim": PROJECTION}))
    if processor:
        (path / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
    return path
