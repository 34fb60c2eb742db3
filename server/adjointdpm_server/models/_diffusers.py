"""`diffusers`: Stable Diffusion 1.x/2.x from a local diffusers-format directory (docs/design.md §2, §4).

The directory holds ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and ``scheduler/`` as
``StableDiffusionPipeline.save_pretrained`` writes them. Every part is read with
``local_files_only=True`` after checking that it exists, so nothing is ever fetched from a hub.

What is differentiated, and how (AdjointDPM paper §3.1: gradients w.r.t. ``x_T``, the
conditioning and the weights; docs/design.md §2 "Stable Diffusion specifics"):

- ``x_T`` (paper §4.1.2, security auditing): ``sample(backend.eps_fn, x_T.requires_grad_(), ...)``.
- the prompt embedding: ``c = backend.encode(...)``; ``c.cond.requires_grad_()``.
- one new token's input embedding (paper Appendix A, textual inversion), *through* the CLIP
  text encoder: :meth:`StableDiffusionBackend.encode_with_token`.
- UNet weights (paper §4.2, stylization), as LoRA: :meth:`StableDiffusionBackend.add_lora`
  gives an ``eps_fn`` of its own.

The loss is usually on the decoded image, so ``∂L/∂x_0`` is the VJP of the VAE decoder:
``loss(backend.decode(x0))``. A loss on latents simply does not call :meth:`decode` (and skips
the decoder's cost in the forward and the backward pass).

The resident model (UNet, VAE, text encoder, tokenizer) is frozen and never modified: fine-tunes
and inversions work on copies, adapters or substituted activations (docs/design.md §4, Operations).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from ..core import VPSchedule
from ._latent import LatentDiffusionBackend
from ._text import TextEncoder

__all__ = ["StableDiffusionBackend", "TextConditionalEps", "VPredictionEps"]

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class TextConditionalEps(nn.Module):
    """``eps_fn(x, t, cond)`` around a diffusers ``UNet2DConditionModel`` (ε-prediction).

    An ``nn.Module`` so that ``sample`` differentiates whichever UNet weights require grad.
    """

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, cond):
        return self.unet(x, t, encoder_hidden_states=cond).sample


class VPredictionEps(TextConditionalEps):
    """ε from a v-prediction UNet (SD 2.x 768-v): ``v = α ε − σ x_0`` gives ``ε = σ x + α v``.

    The solvers integrate ε (paper eq. 10), so the conversion uses the same schedule they do.
    """

    def __init__(self, unet, schedule: VPSchedule):
        super().__init__(unet)
        self.schedule = schedule

    def forward(self, x, t, cond):
        v = super().forward(x, t, cond)
        # t is (B,): looking α up on the CPU costs one tiny copy, next to a UNet call.
        log_alpha = self.schedule.log_alpha(t.detach().to("cpu", torch.float64))
        shape = (-1,) + (1,) * (x.dim() - 1)
        alpha = log_alpha.exp().to(x.device, x.dtype).reshape(shape)
        sigma = (-torch.expm1(2.0 * log_alpha)).sqrt().to(x.device, x.dtype).reshape(shape)
        return sigma * x + alpha * v


def load_alphas_cumprod(path: Path) -> tuple[torch.Tensor, str]:
    """ᾱ_n and the prediction type from ``scheduler/``, through the scheduler class it names.

    Every SD scheduler (PNDM, DDIM, DDPM, Euler, DPM-Solver, …) derives the same ᾱ from the same
    betas; using diffusers' own code keeps ``trained_betas`` and beta schedules exact.
    """
    import diffusers

    config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    cls = getattr(diffusers, str(config.get("_class_name", "")), None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = diffusers.DDPMScheduler
    scheduler = cls.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        scheduler = diffusers.DDPMScheduler.from_config(scheduler.config)
        alphas_cumprod = scheduler.alphas_cumprod
    return alphas_cumprod, scheduler.config.get("prediction_type", "epsilon")


class StableDiffusionBackend(LatentDiffusionBackend):
    """Stable Diffusion 1.x/2.x, resident and frozen, read from a local diffusers directory.

    ``device``/``dtype``: float16 and bfloat16 need CUDA; on the CPU only float32 (SD's training
    precision) or float64 (exact gradient comparisons in tests) are accepted. ``height``/``width``
    override the native image size (``unet.config.sample_size × vae_scale_factor``); they must be
    multiples of the VAE scale factor (8 for SD). ``variant`` picks weight files such as
    ``*.fp16.safetensors``.
    """

    name = "diffusers"
    family = "sd"
    default_steps = 20
    default_guidance = 7.5
    lora_targets = LORA_TARGETS
    parts = PARTS
    title = "Stable Diffusion"

    @property
    def cond_shape(self) -> tuple[int, ...]:
        return (self.max_length, self.text_encoder.config.hidden_size)

    def __init__(self, path: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str = torch.float32, *, height: int | None = None,
                 width: int | None = None, variant: str | None = None):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        device, dtype = self._open(path, device, dtype, variant)
        unet = self._part(UNet2DConditionModel, "unet", dtype)
        self.vae = self._part(AutoencoderKL, "vae", dtype)
        self.text_encoder = self._part(CLIPTextModel, "text_encoder")
        self.tokenizer = self._tokenizer(CLIPTokenizer, "tokenizer")
        alphas_cumprod, self.prediction_type = load_alphas_cumprod(self.path)
        self.schedule = VPSchedule.from_alphas_cumprod(alphas_cumprod)

        self.text_encoder.to(dtype=dtype)  # diffusers models were loaded in dtype already
        self._freeze(device, unet, self.vae, self.text_encoder)
        self.unet = unet
        self.eps_fn = self._eps_module(unet)

        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        f = self.vae_scale_factor
        height, width = self._image_size(unet.config.sample_size * f, height, width, f)
        self.latent_shape = (unet.config.in_channels, height // f, width // f)
        self.image_shape = (self.vae.config.out_channels, height, width)
        self.max_length = min(int(self.tokenizer.model_max_length),
                              self.text_encoder.config.max_position_embeddings)
        self.text_encoders = [TextEncoder(self.tokenizer, self.text_encoder, self.max_length)]

    def _eps_module(self, unet) -> TextConditionalEps:
        if self.prediction_type == "epsilon":
            return TextConditionalEps(unet)
        if self.prediction_type == "v_prediction":
            return VPredictionEps(unet, self.schedule)
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r} in the scheduler "
                         "config (epsilon and v_prediction are)")

    def _embed(self, texts: list[str], token=None) -> torch.Tensor:
        """CLIP's last hidden state (SD's ``cond``)."""
        (piece,) = self._token_pieces(token)
        return self._run(self.text_encoders[0], texts, piece).last_hidden_state

    # -- fine-tuning ----------------------------------------------------------------------------
    def add_lora(self, rank: int = 4, alpha: float | None = None,
                 target_modules=LORA_TARGETS, adapter_name: str = "default", *,
                 init_lora_weights=True, share_base_weights: bool = False) -> TextConditionalEps:
        """An ``eps_fn`` whose UNet carries a fresh peft LoRA adapter; only LoRA weights train.

        The resident UNet is never touched: the adapter goes onto a ``copy.deepcopy`` of it. That
        copy costs one more UNet in memory (SD 1.x: 860 M parameters, 1.7 GB in float16, 3.4 GB in
        float32), freed with the returned module. ``share_base_weights=True`` instead copies only
        the module tree and shares the frozen base tensors with the resident UNet (zero weight
        memory); then the returned module must not be moved or cast (``.to(...)``/``.half()``
        convert parameters in place) nor have its adapter merged — all would change the
        resident weights. Pass ``init_lora_weights`` through to peft (default: B = 0, so the
        adapted model starts equal to the base one and ``∂L/∂A`` starts at zero).
        """
        from peft import LoraConfig

        if rank < 1:
            raise ValueError(f"rank must be >= 1; got {rank}")
        memo = {}
        if share_base_weights:
            memo = {id(t): t for t in (*self.unet.parameters(), *self.unet.buffers())}
        unet = copy.deepcopy(self.unet, memo)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha,
                                    target_modules=list(target_modules),
                                    init_lora_weights=init_lora_weights), adapter_name=adapter_name)
        for name, param in unet.named_parameters():
            param.requires_grad_("lora_" in name and f".{adapter_name}." in name)
        return self._eps_module(unet)
