"""Reward models as losses: the sign convention, CLIP's image preprocessing in torch, local loading.

**Sign convention** (stated here once; docs/design.md §4.3). A loss is minimised. A reward model
scores each sample, r(x_i), higher meaning better; its plugin (a ``RewardPlugin``) returns the
loss ℓ_i = −r(x_i), one per sample. A request's term of weight w therefore adds −w·r(x_i) to the
objective: a positive weight maximises the reward, a negative one minimises it. Each reward
plugin's ``description`` says "loss = −reward".

Reward models are read from local directories named by server flags (``--aesthetic-model-dir``,
``--preference-model-dir``), like the models; nothing is downloaded (``local_files_only``).
"""

from __future__ import annotations

import abc
import copy
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..errors import FailedPrecondition, InvalidArgument
from ._base import LossPlugin
from ._clip import _lock

__all__ = ["RewardPlugin", "ClipPreprocess", "model_dir", "placed", "compute_dtype", "image_embeddings",
           "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD"]

# transformers.image_utils.OPENAI_CLIP_MEAN / _STD: CLIPImageProcessor's defaults
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_MODES = {2: "bilinear", 3: "bicubic"}  # PIL resample codes → torch modes (antialiased, as PIL)


class RewardPlugin(LossPlugin):
    """A reward model as a loss: ``reward(x)`` scores each sample (higher = better) and the loss
    is its negation, −reward (the module docstring's sign convention)."""

    @abc.abstractmethod
    def reward(self, x: torch.Tensor) -> torch.Tensor:
        """The reward of each sample of ``x``, shape (B,), differentiable in x."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return -self.reward(x)


def model_dir(plugin: str, settings: Mapping[str, Any], key: str, flag: str) -> Path:
    """The local directory ``settings[key]`` (set by ``flag``), or FailedPrecondition naming the flag."""
    directory = settings.get(key)
    if not directory or not Path(directory).is_dir():
        raise FailedPrecondition(
            f"{plugin}: {flag} {directory} is not a directory; it must name a local model directory "
            "(as transformers' save_pretrained writes it; nothing is downloaded)")
    return Path(directory)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 images are scored in float64 (a ``--dtype float64`` server); all others in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@lru_cache(maxsize=8)
def _placed(loader: Callable[[str], torch.nn.Module], directory: str, dtype: torch.dtype,
            device: torch.device) -> torch.nn.Module:
    base = loader(directory)
    parameter = next(base.parameters())
    if parameter.dtype == dtype and parameter.device == device:
        return base
    return copy.deepcopy(base).to(device=device, dtype=dtype).eval().requires_grad_(False)


def placed(loader: Callable[[str], torch.nn.Module], directory: str, dtype: torch.dtype,
           device: torch.device) -> torch.nn.Module:
    """``loader(directory)``'s frozen module in ``dtype`` on ``device``: a copy, made once and
    kept, where the loaded one differs (float64 requests; a GPU server's images)."""
    with _lock:
        return _placed(loader, directory, dtype, torch.device(device))


def image_embeddings(features) -> torch.Tensor:
    """L2-normalised image embeddings from ``get_image_features`` / ``image_embeds`` output."""
    features = getattr(features, "pooler_output", features)
    return torch.nn.functional.normalize(features, dim=-1)


@dataclass(frozen=True)
class ClipPreprocess:
    """``CLIPImageProcessor``'s steps, in torch (differentiable), on images already in [0, 1]:
    grayscale → RGB, resize (shortest edge to ``size``, the long edge ``int(size · long / short)``,
    or to height × width) with PIL's antialiased filter, centre crop (top/left as
    ``(in − out) // 2``), then ``(x − mean) / std``. Read from the directory's
    ``preprocessor_config.json``; without one, the processor's defaults at the model's image size.
    """

    size: int | tuple[int, int] | None   # shortest edge, or (height, width); None: no resize
    crop: tuple[int, int] | None         # (height, width); None: no crop
    mean: tuple[float, ...] | None       # None: no normalisation
    std: tuple[float, ...] | None
    mode: str = "bicubic"

    @classmethod
    def from_dir(cls, path: Path, image_size: int, flag: str) -> "ClipPreprocess":
        file = Path(path) / "preprocessor_config.json"
        if not file.is_file():
            return cls(image_size, (image_size, image_size), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        cfg = json.loads(file.read_text())
        size = cfg.get("size", {"shortest_edge": 224})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        crop = cfg.get("crop_size", {"height": 224, "width": 224})
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        resample = cfg.get("resample", 3)
        if resample not in _MODES or not (set(size) == {"shortest_edge"} or set(size) == {"height", "width"}):
            raise FailedPrecondition(f"{flag} {path}: unsupported preprocessor_config.json (resample "
                                     f"{resample}, size {size}); supported: bicubic or bilinear, "
                                     "shortest_edge or height/width")
        do_crop = cfg.get("do_center_crop", True)
        out = (crop["height"], crop["width"]) if do_crop else None
        if out is not None and out != (image_size, image_size):
            raise FailedPrecondition(f"{flag} {path}: the processor crops to {out}; the model takes "
                                     f"{image_size}×{image_size}")
        normalize = cfg.get("do_normalize", True)
        return cls(
            size=(None if not cfg.get("do_resize", True) else
                  size["shortest_edge"] if "shortest_edge" in size else (size["height"], size["width"])),
            crop=out,
            mean=tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)) if normalize else None,
            std=tuple(cfg.get("image_std", OPENAI_CLIP_STD)) if normalize else None,
            mode=_MODES[resample])

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """transformers' ``get_resize_output_image_size(default_to_square=False)``."""
        if self.size is None:
            return height, width
        if isinstance(self.size, tuple):
            return self.size
        if width <= height:
            return int(self.size * height / width), self.size
        return self.size, int(self.size * width / height)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise InvalidArgument(f"a CLIP reward needs images (B, 1 or 3, H, W); got {tuple(x.shape)}")
        if x.shape[1] == 1:  # convert_rgb: L → RGB repeats the channel
            x = x.expand(-1, 3, -1, -1)
        size = self.resized(*x.shape[-2:])
        if size != tuple(x.shape[-2:]):  # PIL returns an unchanged copy at the same size
            x = torch.nn.functional.interpolate(x, size=size, mode=self.mode, antialias=True,
                                                align_corners=False)
        if self.crop is not None and self.crop != size:
            top, left = (size[0] - self.crop[0]) // 2, (size[1] - self.crop[1]) // 2
            if top < 0 or left < 0:
                raise InvalidArgument(f"a CLIP reward: images resized to {size} are smaller than "
                                      f"the crop {self.crop}")
            x = x[..., top:top + self.crop[0], left:left + self.crop[1]]
        if self.mean is not None:
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = (x - mean) / std
        return x
