"""``aesthetic``: an aesthetic predictor of the LAION kind as a reward (loss = −score).

score(x) = head(normalize(CLIP image embedding of x)): the vision tower and visual projection of a
CLIP (``CLIPVisionModelWithProjection``), the embedding L2-normalised, then the MLP of LAION's
"improved aesthetic predictor" — Linear(d, 1024) → Dropout(0.2) → Linear(1024, 128) →
Dropout(0.2) → Linear(128, 64) → Dropout(0.1) → Linear(64, 16) → Linear(16, 1), no activations,
dropout inactive (eval). Offered when the server is started with ``--aesthetic-model-dir DIR``:

- ``DIR``: a CLIP as transformers saves it — a ``CLIPVisionModelWithProjection`` or a whole
  ``CLIPModel`` (its text tower is not loaded) — and, optionally, ``preprocessor_config.json``;
- ``DIR/head.safetensors``: the head's weights under LAION's keys (``layers.0.weight`` …
  ``layers.7.bias``; LAION's ``.pth`` converts with ``safetensors.torch.save_file``);
- ``DIR/head_config.json``: ``{"input_dim": d}``, d the CLIP's ``projection_dim``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import FailedPrecondition
from ._reward import ClipPreprocess, RewardPlugin, compute_dtype, image_embeddings, model_dir, placed

__all__ = ["AestheticLoss", "AestheticHead", "AestheticModel", "HEAD_WEIGHTS", "HEAD_CONFIG", "FLAG"]

HEAD_WEIGHTS, HEAD_CONFIG = "head.safetensors", "head_config.json"
FLAG = "--aesthetic-model-dir"


class AestheticHead(torch.nn.Module):
    """LAION's improved-aesthetic-predictor MLP (its module and state-dict names)."""

    def __init__(self, input_dim: int):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_dim, 1024), torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding)[..., 0]


class AestheticModel(torch.nn.Module):
    """Preprocessed pixels → one score per image."""

    def __init__(self, vision, head: AestheticHead):
        super().__init__()
        self.vision, self.head = vision, head

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(image_embeddings(self.vision(pixel_values=pixel_values).image_embeds))


@lru_cache(maxsize=2)
def _load(directory: str) -> AestheticModel:
    from safetensors.torch import load_file
    from transformers import CLIPVisionModelWithProjection

    path = Path(directory)
    for name in (HEAD_WEIGHTS, HEAD_CONFIG):
        if not (path / name).is_file():
            raise FailedPrecondition(f"aesthetic: {FLAG} {directory} has no {name} (the aesthetic "
                                     f"head: {HEAD_WEIGHTS} and {HEAD_CONFIG} beside the CLIP)")
    try:
        vision = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise FailedPrecondition(f"aesthetic: {FLAG} {directory} holds no loadable CLIP: {err}") from err
    input_dim = json.loads((path / HEAD_CONFIG).read_text()).get("input_dim")
    if input_dim != vision.config.projection_dim:
        raise FailedPrecondition(f"aesthetic: {FLAG} {directory}: {HEAD_CONFIG} says input_dim "
                                 f"{input_dim}; the CLIP's projection_dim is {vision.config.projection_dim}")
    head = AestheticHead(input_dim)
    try:
        head.load_state_dict(load_file(path / HEAD_WEIGHTS))
    except RuntimeError as err:
        raise FailedPrecondition(f"aesthetic: {FLAG} {directory}: {HEAD_WEIGHTS} is not LAION's "
                                 f"head for input_dim {input_dim}: {err}") from err
    return AestheticModel(vision, head).float().eval().requires_grad_(False)


@lru_cache(maxsize=2)
def _preprocess(directory: str) -> ClipPreprocess:
    return ClipPreprocess.from_dir(Path(directory), _load(directory).vision.config.image_size, FLAG)


class AestheticLoss(RewardPlugin):
    name = "aesthetic"
    description = ("LAION-style aesthetic score (an MLP on CLIP's normalised image embedding, "
                   "--aesthetic-model-dir); loss = −score per sample, so a positive weight raises it")

    @classmethod
    def available(cls, settings) -> bool:
        return bool(settings.get("aesthetic_model_dir"))

    def __init__(self, context, params, tensors):
        super().__init__(context, params, tensors)
        self.directory = str(model_dir(self.name, context.settings, "aesthetic_model_dir", FLAG))
        placed(_load, self.directory, torch.float32, torch.device("cpu"))  # load (and check) now
        self.preprocess = _preprocess(self.directory)

    def reward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        model = placed(_load, self.directory, dtype, x.device)
        return model(self.preprocess(x.to(dtype)))
