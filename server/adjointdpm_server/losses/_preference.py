"""``preference``: a CLIP image–text preference score of the PickScore / HPS kind as a reward.

score(x, prompt) = exp(logit_scale) · cos(CLIP image embedding of x, CLIP text embedding of the
prompt) — PickScore's formula (``model.logit_scale.exp() * text_embs @ image_embs.T``) on a
``CLIPModel`` read from ``--preference-model-dir DIR`` (the model, its tokenizer files and,
optionally, ``preprocessor_config.json``; nothing is downloaded). The loss is −score per sample.
The CLIP is loaded and tokenized as ``clip_similarity``'s (one resident copy where both flags
name the same directory); the images are preprocessed as CLIP's processor does (``ClipPreprocess``).

Without ``prompt`` each sample is scored against the prompt it was generated with
(``LossContext.prompts``): a fine-tune over a prompt set scores every drawn sample against its own
prompt (AlignProp / DRaFT with PickScore). A request whose samples have no prompts (class labels,
a tensor or learned conditioning, a prompt holding a token's placeholder) must give ``prompt``:
refused when the plugin is built. Text embeddings are computed once per distinct prompt string
and request (``PromptEmbeddings``), whichever way the prompts come.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from ..errors import InvalidArgument
from ._clip import _load as _load_clip
from ._clip import PromptEmbeddings, _lock
from ._reward import ClipPreprocess, RewardPlugin, compute_dtype, image_embeddings, model_dir, placed

__all__ = ["PreferenceLoss", "FLAG"]

FLAG = "--preference-model-dir"


def _model(directory: str):
    return _load_clip(directory)[0]


@lru_cache(maxsize=2)
def _preprocess(directory: str) -> ClipPreprocess:
    return ClipPreprocess.from_dir(Path(directory), _model(directory).config.vision_config.image_size, FLAG)


class PreferenceLoss(RewardPlugin):
    name = "preference"
    description = ("CLIP preference score of the PickScore kind, exp(logit_scale)·cos(image, `prompt`) "
                   "(--preference-model-dir; `prompt` defaults to each sample's own generation prompt); "
                   "loss = −score per sample, so a positive weight raises it")
    params = {"prompt": "the prompt the images are scored against: a string, or a list of one per "
                        "sample; default: each sample's own generation prompt"}

    @classmethod
    def available(cls, settings) -> bool:
        return bool(settings.get("preference_model_dir"))

    def __init__(self, context, params, tensors):
        super().__init__(context, params, tensors)
        prompt = params.get("prompt")
        if prompt is None:  # each sample's own prompt, set per scored batch
            context.require_own("prompts", "preference", "prompt",
                                "a non-empty string or a list of them, one per sample")
            self.prompts = None
        else:
            prompts = prompt if isinstance(prompt, list) else [prompt]
            if not prompts or not all(isinstance(p, str) and p for p in prompts):
                raise InvalidArgument("preference needs the parameter 'prompt': a non-empty string or a "
                                      f"list of them, one per sample; got {prompt!r}")
            self.prompts = prompts
        self.directory = str(model_dir(self.name, context.settings, "preference_model_dir", FLAG))
        with _lock:
            _load_clip(self.directory)  # a broken directory fails here, before any work
        self.preprocess = _preprocess(self.directory)
        self.texts = PromptEmbeddings(self.directory)

    def reward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        if self.prompts is None:
            prompts = self.context.prompts(batch)
        elif len(self.prompts) in (1, batch):
            prompts = self.prompts * batch if len(self.prompts) == 1 else self.prompts
        else:
            raise InvalidArgument(f"preference: {len(self.prompts)} prompts for a batch of {batch}")
        dtype = compute_dtype(x)
        model = placed(_model, self.directory, dtype, x.device)
        text = self.texts(model, prompts)
        image = image_embeddings(model.get_image_features(pixel_values=self.preprocess(x.to(dtype))))
        return model.logit_scale.exp() * (image * text).sum(-1)
