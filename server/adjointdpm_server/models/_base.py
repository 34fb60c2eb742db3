"""The one interface every model backend implements (docs/design.md §4).

A backend owns a noise predictor ``eps_fn(x, t, cond)`` (an ``nn.Module`` so that ``sample``
differentiates its weights), the VP schedule it was trained with, the shape of ``x_T``, a way to
turn prompts or class labels into conditioning tensors (plus the unconditional ones for CFG), and
a differentiable ``decode`` from ``x_0`` to an image in [0, 1].
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from torch import nn

from ..core import FlowSchedule, VPSchedule
from ..core._prediction import eps_coefficients

__all__ = ["Conditioning", "ModelBackend"]


@dataclass
class Conditioning:
    """``cond`` for the request and ``uncond`` for classifier-free guidance (either may be None)."""

    cond: torch.Tensor | None
    uncond: torch.Tensor | None = None


class ModelBackend(abc.ABC):
    """A resident model: path, network and what it predicts, conditioning, differentiable decoding."""

    name: str
    schedule: VPSchedule | FlowSchedule
    eps_fn: nn.Module  # returns what ``prediction`` names (core/_prediction.py)
    prediction: str = "epsilon"  # epsilon, v, velocity (flow models) or sample
    default_grid: str = "logsnr"  # the time grid a request gets when it names none
    latent_shape: tuple[int, ...]  # one sample's x_T
    image_shape: tuple[int, ...]  # one decoded image, (C, H, W)
    default_steps: int = 20
    default_guidance: float | None = None
    conditioning: str = "tensor"  # what encode() takes: "labels", "prompt" or "tensor"
    family: str = ""  # the architecture family of a diffusers directory: sd, sdxl, sd3, flux
    # "cfg": classifier-free guidance from cond and uncond; "embedded": the scale is an input of
    # the network itself (FLUX-dev's guidance embedding), written into cond by guide()
    guidance: str = "cfg"
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    # Optional capabilities, declared (callers read these flags, never probe with hasattr):
    has_text_encoder: bool = False  # encode_with_token, token_init, token_dim (textual inversion)
    has_classifier: bool = False    # classify (the classifier loss, audits)
    has_embedding_table: bool = False  # embedding_table (priors for learned embeddings)

    @property
    def device(self) -> torch.device:
        return next(self.eps_fn.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.eps_fn.parameters()).dtype

    def noise(self, batch: int, seed: int | None = None) -> torch.Tensor:
        """``x_T ~ N(0, I)`` of this model's latent shape, seeded on the CPU for reproducibility."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        x = torch.randn((batch, *self.latent_shape), generator=gen, dtype=torch.float32)
        return x.to(self.device, self.dtype)

    @abc.abstractmethod
    def encode(self, batch: int, *, prompt=None, labels=None, negative_prompt=None) -> Conditioning:
        """Conditioning for ``batch`` samples from a prompt (str or list) or class labels."""

    @abc.abstractmethod
    def decode(self, x0: torch.Tensor, plan=None) -> torch.Tensor:
        """``x_0`` → image in [0, 1], shape (B, C, H, W), differentiable; ``plan``: the one
        ``plan_decoder`` made (backends whose decoder is cheap ignore it)."""

    plans_decoder = False  # a latent backend's VAE decoder is planned (models/_decoding.py)

    def plan_decoder(self, batch: int, budget: float | None, tile: int = 0):
        """The decoder's plan for an image-domain gradient of ``batch`` samples within ``budget``
        bytes (in tiles of ``tile`` latent pixels, approximate, when asked): None where decoding
        costs next to nothing (pixel-space and analytic models, which have no tiles)."""
        return None

    @property
    def cond_shape(self) -> tuple[int, ...]:
        """One sample's continuous conditioning (what ``embed`` returns, without the batch)."""
        return tuple(self.latent_shape)

    def guide(self, c: Conditioning, scale: float | None) -> Conditioning:
        """``c`` carrying the guidance scale, for ``guidance == "embedded"``; CFG models keep ``c``
        (the sampler combines cond and uncond)."""
        return c

    def embed(self, c: Conditioning) -> Conditioning:
        """The continuous form of a conditioning, to differentiate (labels → vectors)."""
        return c

    def style_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps (B, C, H, W) for Gram-matrix style losses (paper eq. 13; VGG cannot be
        downloaded here, so each backend offers an offline network). Default: pixels at two scales."""
        return [images, torch.nn.functional.avg_pool2d(images, 2)]

    # -- optional capabilities (see the flags above) ---------------------------------------------
    @property
    def token_dim(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} has no text encoder")

    def token_init(self, word: str) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no text encoder")

    def random_token(self, seed: int = 0) -> torch.Tensor:
        """A random start for a learned token, at the scale of the model's own embeddings."""
        raise NotImplementedError(f"{type(self).__name__} has no text encoder")

    def encode_with_token(self, batch: int, prompt, token_embedding: torch.Tensor, *,
                          placeholder: str = "<*>", negative_prompt=None) -> Conditioning:
        """Conditioning with a new token's input embedding placed at ``placeholder``."""
        raise NotImplementedError(f"{type(self).__name__} has no text encoder")

    def embedding_table(self) -> torch.Tensor:
        """(N, D): the model's own embeddings a learned one should resemble (a prior's statistics):
        the digits' class vectors, SD's token input embeddings."""
        raise NotImplementedError(f"{type(self).__name__} has no embedding table")

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits of decoded images (differentiable)."""
        raise NotImplementedError(f"{type(self).__name__} has no classifier")

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """ε at ``(x, t)``: ``eps_fn``'s output (what ``prediction`` names) turned into ε with the
        sampler's own map (core/_prediction.py), so a v or velocity model answers in ε too."""
        out = self.eps_fn(x, t, cond)
        if self.prediction == "epsilon":
            return out
        t64 = torch.as_tensor(t).detach().to("cpu", torch.float64)
        dalpha = dsigma = None
        if self.prediction == "velocity":
            dalpha, dsigma = self.schedule.velocity_coefficients(t64)
        a, b = eps_coefficients(self.prediction, self.schedule.alpha(t64), self.schedule.sigma(t64),
                                dalpha, dsigma)
        shape = (-1,) + (1,) * (x.dim() - 1)
        a, b = (torch.as_tensor(v, dtype=torch.float64).reshape(shape).to(x.device, out.dtype)
                for v in (a, b))
        return a * out + b * x.to(out.dtype)
