"""``clip_similarity``: 1 − cos(CLIP image embedding, CLIP text embedding), from a local CLIP.

Offered only when the server is started with ``--clip-model-dir`` (a transformers ``CLIPModel``
and its processor files; nothing is downloaded). The audit of §4.1.2 uses it with a negative
weight (push away from a prompt). Without ``text``, each sample is compared with the prompt it was
generated with (``LossContext.prompts``; refused when the plugin is built for samples without
prompts).
"""

from __future__ import annotations

import threading
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import FailedPrecondition, InvalidArgument
from ._base import LossPlugin

__all__ = ["ClipSimilarityLoss", "PromptEmbeddings"]

_lock = threading.Lock()


@lru_cache(maxsize=2)
def _load(directory: str):
    from transformers import CLIPModel, CLIPTokenizer

    path = Path(directory)
    if not path.is_dir():
        raise FailedPrecondition(f"the CLIP model directory {directory} does not exist")
    model = CLIPModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def tokenize(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids of ``texts`` as CLIP's text tower takes them, padded to its context length (the
    causal mask keeps padding after the end token out of the pooled embedding); hold ``_lock``."""
    return tokenizer(list(texts), padding="max_length", truncation=True,
                     max_length=model.config.text_config.max_position_embeddings,
                     return_tensors="pt").input_ids


def text_embeddings(model, ids: torch.Tensor) -> torch.Tensor:
    """CLIP's L2-normalised text embeddings of token ids, (N, projection_dim), without gradient."""
    with torch.no_grad():
        t = model.get_text_features(input_ids=ids.to(model.device))
        t = getattr(t, "pooler_output", t)
    return torch.nn.functional.normalize(t, dim=-1)


class PromptEmbeddings:
    """CLIP text embeddings by prompt string, for one request: each distinct prompt is tokenized
    (with the tokenizer of the CLIP in ``directory``) and embedded once per copy of the CLIP that
    scores (its dtype and device), so a prompt scored again (another iteration, another pass) is
    not re-encoded. Each prompt goes through the text tower alone: its embedding, to the last
    bit, does not depend on the prompts it first came with (a resumed fine-tune, whose cache
    starts anew, scores as the uninterrupted run did)."""

    def __init__(self, directory: str):
        self.directory = directory
        self.cache: dict = {}  # (dtype, device) → {prompt: its embedding}

    def __call__(self, model, prompts: list[str]) -> torch.Tensor:
        """(len(prompts), projection_dim): each prompt's normalised embedding from ``model`` (the
        CLIP of ``directory``, possibly a copy in another dtype or on another device)."""
        parameter = next(model.parameters())
        known = self.cache.setdefault((parameter.dtype, parameter.device), {})
        missing = [p for p in dict.fromkeys(prompts) if p not in known]
        if missing:
            with _lock:
                base, tokenizer = _load(self.directory)
                ids = tokenize(base, tokenizer, missing)
            for prompt, row in zip(missing, ids):
                known[prompt] = text_embeddings(model, row[None])[0]
        return torch.stack([known[p] for p in prompts])


class ClipSimilarityLoss(LossPlugin):
    name = "clip_similarity"
    description = ("1 − cosine similarity between CLIP's embeddings of the image and of `text` "
                   "(default: each sample's own generation prompt)")
    params = {"text": "the prompt to compare with; default: each sample's own generation prompt"}

    @classmethod
    def available(cls, settings) -> bool:
        return bool(settings.get("clip_model_dir"))

    def __init__(self, context, params, tensors):
        super().__init__(context, params, tensors)
        text = params.get("text")
        if text is None:  # each sample's own prompt, set per scored batch
            context.require_own("prompts", "clip_similarity", "text", "a non-empty string")
        elif not isinstance(text, str) or not text:
            raise InvalidArgument("clip_similarity needs the parameter 'text' (a non-empty string)")
        self.fixed = text
        directory = str(context.settings["clip_model_dir"])
        with _lock:
            self.model, _ = _load(directory)
        self.texts = PromptEmbeddings(directory)
        if text is not None:
            self.texts(self.model, [text])  # embedded once, before any work
        size = self.model.config.vision_config.image_size
        self.size = size
        self.mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        self.std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        prompts = self.context.prompts(batch) if self.fixed is None else [self.fixed] * batch
        text = self.texts(self.model, prompts)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = torch.nn.functional.interpolate(x.float(), size=(self.size, self.size), mode="bicubic",
                                            align_corners=False)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        features = self.model.get_image_features(pixel_values=x)
        features = getattr(features, "pooler_output", features)
        image = torch.nn.functional.normalize(features, dim=-1)
        return 1 - (image * text.to(image.device)).sum(-1)
