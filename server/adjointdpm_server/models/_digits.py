"""`digits`: the embedded default — a class-conditional DPM on 8×8 digits, with its classifier.

Weights live in ``weights/digits/`` (trained by ``scripts/train_digits_dpm.py`` and
``scripts/train_digits_classifier.py``); conditioning is a class label 0–9 and label 10 is the
unconditional one used for classifier-free guidance. ``digits-flow`` (``weights/digits-flow/``,
``train_digits_dpm.py --flow``) is the same network trained as a rectified flow that predicts
velocity: the CPU-sized stand-in for SD3/FLUX-type models, sharing the classifier.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..core import FlowSchedule, VPSchedule
from ._base import Conditioning, ModelBackend
from ._digits_classifier import DigitsClassifier

__all__ = ["DigitsBackend", "DigitsFlowBackend", "DIGITS_WEIGHTS", "DIGITS_FLOW_WEIGHTS", "NULL_CLASS"]

DIGITS_WEIGHTS = Path(__file__).resolve().parent / "weights" / "digits"
DIGITS_FLOW_WEIGHTS = Path(__file__).resolve().parent / "weights" / "digits-flow"
NULL_CLASS = 10


class LabelOrVectorEmbedding(nn.Embedding):
    """The class embedding, which also passes float rows through unchanged.

    A learned conditioning vector (``OptimizeEmbedding``, gradients w.r.t. the conditioning)
    then stands in for a label in ``unet(x, t, class_labels=...)``; state-dict keys stay those of
    ``nn.Embedding``.
    """

    def forward(self, labels_or_vectors: torch.Tensor) -> torch.Tensor:
        if labels_or_vectors.is_floating_point():
            return labels_or_vectors.to(self.weight.dtype)
        return super().forward(labels_or_vectors)


class ClassConditionalEps(nn.Module):
    """``eps_fn(x, t, cond)`` around a diffusers ``UNet2DModel`` with a class embedding;
    ``cond`` is class labels (long) or class-embedding vectors (float, (B, embedding_dim))."""

    def __init__(self, unet):
        super().__init__()
        if type(unet.class_embedding) is nn.Embedding:
            unet.class_embedding.__class__ = LabelOrVectorEmbedding
        self.unet = unet

    def forward(self, x, t, labels):
        return self.unet(x, t, class_labels=labels).sample


class FlowVelocity(ClassConditionalEps):
    """The velocity ``u = ε − x_0`` of a rectified-flow UNet, whose timestep is ``1000·σ_t``
    (SD3's convention), as ``eps_fn(x, t, cond)`` on the schedule's time t."""

    def __init__(self, unet, schedule: FlowSchedule):
        super().__init__(unet)
        self.schedule = schedule

    def forward(self, x, t, labels):
        return self.unet(x, 1000.0 * self.schedule.sigma(t), class_labels=labels).sample


def parse_labels(batch: int, labels=None, prompt=None) -> torch.Tensor:
    """Class labels from ints or digit strings ("7"), one or one per sample."""
    if labels is None and prompt is not None:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not all(isinstance(p, str) and p.strip().isdigit() and len(p.strip()) == 1 for p in prompts):
            raise ValueError("the digits model takes a single digit 0–9 as its prompt")
        labels = [int(p) for p in prompts]
    if labels is None:
        return torch.full((batch,), NULL_CLASS, dtype=torch.long)
    labels = torch.as_tensor(labels, dtype=torch.long).flatten()
    if labels.numel() == 1:
        labels = labels.expand(batch)
    if labels.numel() != batch:
        raise ValueError(f"got {labels.numel()} labels for a batch of {batch}")
    if bool(((labels < 0) | (labels > 9)).any()):
        raise ValueError("class labels must lie in 0–9")
    return labels.clone()


NOISE_END = 850  # where sampling from pure noise starts (benchmarks/results/digits_quality.md)


def _sampling_span(alphas_cumprod: torch.Tensor, t_max: int = NOISE_END) -> torch.Tensor:
    """The training schedule's steps 0 … ``t_max``: sampling from pure noise starts at t_max.

    The cosine schedule clips β at 0.999, so its last steps sweep λ down to −9.9, pure noise to
    the model; and starting lower helps this small model further. FD-digits (1000 samples, CFG 2,
    dpm3) at 5/10/20 steps measured on the λ-uniform grid: from t = 994 (λ ≥ −5) 5.83/3.74/3.58,
    from 900 3.53/3.18/3.16, from 850 3.39/3.05/3.06, from 800 3.38/3.06/3.07; on Karras' ρ-grid
    (the default, ``DigitsBackend.default_grid``): from 900 3.02/3.12/3.15, 875 3.05/3.07/3.09,
    850 3.07/3.02/3.05, 800 3.13/3.06/3.07. The best diffusers schedulers as loaded reach 3.06
    (UniPC) / 3.04 (PNDM) / 3.20 (PNDM) (benchmarks/results/digits_quality.md).
    """
    return alphas_cumprod[:t_max + 1]


class DigitsBackend(ModelBackend):
    name = "digits"
    latent_shape = (1, 8, 8)
    image_shape = (1, 8, 8)
    default_steps = 20
    default_guidance = 2.0
    default_grid = "karras"  # from t = 850: the best 5/10/20-step FD of the grids measured (_sampling_span)
    conditioning = "labels"
    has_classifier = True
    has_embedding_table = True

    def __init__(self, path: str | Path = DIGITS_WEIGHTS, device="cpu", dtype=torch.float32):
        from diffusers import UNet2DModel
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "unet").is_dir() or not (path / "scheduler").is_dir():
            raise FileNotFoundError(f"{str(path)!r} is not a {self.name} weights directory (it needs unet/ "
                                    "and scheduler/; nothing is fetched from a hub)")
        unet = UNet2DModel.from_pretrained(path / "unet", local_files_only=True)
        self.schedule = self._load_schedule(path)
        # frozen: a request differentiates x_T or the conditioning, never the shared weights
        self.eps_fn = self._network(unet).to(device=device, dtype=dtype).eval().requires_grad_(False)
        classifier = path / "classifier.safetensors"
        self.classifier = DigitsClassifier()
        self.classifier.load_state_dict(load_file(str(classifier if classifier.exists()
                                                       else DIGITS_WEIGHTS / "classifier.safetensors")))
        self.classifier.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def _load_schedule(self, path: Path):
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_pretrained(path / "scheduler", local_files_only=True)
        return VPSchedule.from_alphas_cumprod(_sampling_span(scheduler.alphas_cumprod))

    def _network(self, unet) -> nn.Module:
        return ClassConditionalEps(unet)

    def encode(self, batch: int, *, prompt=None, labels=None, negative_prompt=None) -> Conditioning:
        cond = parse_labels(batch, labels, prompt).to(self.device)
        return Conditioning(cond, torch.full_like(cond, NULL_CLASS))

    @property
    def cond_shape(self) -> tuple[int, ...]:
        return (self.eps_fn.unet.class_embedding.embedding_dim,)

    def embed(self, c: Conditioning) -> Conditioning:
        """Labels → their class-embedding vectors, the continuous conditioning to differentiate."""
        table = self.eps_fn.unet.class_embedding.weight.detach()

        def vectors(labels):
            return labels if labels is None or labels.is_floating_point() else table[labels].clone()

        return Conditioning(vectors(c.cond), vectors(c.uncond))

    def embedding_table(self) -> torch.Tensor:
        """The ten class vectors (the null class's is no digit)."""
        return self.eps_fn.unet.class_embedding.weight.detach()[:NULL_CLASS]

    def decode(self, x0: torch.Tensor, plan=None) -> torch.Tensor:
        return ((x0 + 1.0) / 2.0).clamp(0.0, 1.0)

    def style_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The digits classifier's convolutional activations (8×8×32, 8×8×32, 4×4×64)."""
        h, feats = images * 2.0 - 1.0, []
        for k, layer in enumerate(self.classifier.body):
            h = layer(h)
            if k in (1, 3, 6):
                feats.append(h)
        return feats

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of the digits classifier for images in [0, 1]."""
        return self.classifier(images * 2.0 - 1.0)


class DigitsFlowBackend(DigitsBackend):
    """``digits-flow``: the digits UNet trained as a rectified flow (velocity), α = 1 − σ, σ = t
    (the scheduler config's shift), from t = 0.999 down to the clean end t = 0 on a grid
    uniform in t (a λ-uniform grid cannot reach σ = 0)."""

    name = "digits-flow"
    prediction = "velocity"
    default_grid = "time"

    def __init__(self, path: str | Path = DIGITS_FLOW_WEIGHTS, device="cpu", dtype=torch.float32):
        super().__init__(path, device, dtype)

    def _load_schedule(self, path: Path):
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler", local_files_only=True)
        return FlowSchedule.rectified(shift=float(scheduler.config.shift), t_min=0.0, t_max=0.999)

    def _network(self, unet) -> nn.Module:
        return FlowVelocity(unet, self.schedule)
