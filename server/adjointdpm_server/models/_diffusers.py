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
import threading
from pathlib import Path

import torch
from torch import nn

from ..core import VPSchedule
from ._base import Conditioning, ModelBackend

__all__ = ["StableDiffusionBackend", "TextConditionalEps", "VPredictionEps"]

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
HALF = (torch.float16, torch.bfloat16)
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


def _check_dtype(device: torch.device, dtype) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype; got {dtype!r}")
    if device.type == "cpu" and dtype in HALF:
        raise ValueError(f"{dtype} needs a GPU: on the CPU Stable Diffusion runs in torch.float32 "
                         "(or float64); pass device='cuda' for float16/bfloat16")
    return dtype


def _check_directory(path: Path) -> None:
    """Fail early and clearly: a path that does not exist must not be mistaken for a hub repo id."""
    if not path.is_dir():
        raise FileNotFoundError(f"Stable Diffusion directory {str(path)!r} does not exist (the "
                                "diffusers backend loads local directories only, never a hub)")
    missing = [p for p in PARTS if not (path / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"{str(path)!r} is not a diffusers Stable Diffusion directory: "
                                f"missing {', '.join(p + '/' for p in missing)}")


def _load_alphas_cumprod(path: Path) -> tuple[torch.Tensor, str]:
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


def _broadcast(texts, batch: int, name: str) -> list[str]:
    """One string for all samples, or one per sample."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1; got {batch}")
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or not all(isinstance(s, str) for s in texts):
        raise ValueError(f"{name} must be a string or a list of strings")
    if len(texts) == 1:
        texts = texts * batch
    if len(texts) != batch:
        raise ValueError(f"got {len(texts)} {name}s for a batch of {batch}")
    return texts


class StableDiffusionBackend(ModelBackend):
    """Stable Diffusion 1.x/2.x, resident and frozen, read from a local diffusers directory.

    ``device``/``dtype``: float16 and bfloat16 need CUDA; on the CPU only float32 (SD's training
    precision) or float64 (exact gradient comparisons in tests) are accepted. ``height``/``width``
    override the native image size (``unet.config.sample_size × vae_scale_factor``); they must be
    multiples of the VAE scale factor (8 for SD). ``variant`` picks weight files such as
    ``*.fp16.safetensors``.
    """

    name = "diffusers"
    default_steps = 20
    default_guidance = 7.5
    conditioning = "prompt"
    has_text_encoder = True
    has_embedding_table = True
    lora_targets = LORA_TARGETS

    @property
    def cond_shape(self) -> tuple[int, ...]:
        return (self.max_length, self.text_encoder.config.hidden_size)

    @property
    def token_dim(self) -> int:
        return self.text_encoder.get_input_embeddings().embedding_dim

    def embedding_table(self) -> torch.Tensor:
        """The text encoder's token input embeddings (what a new token joins)."""
        return self.text_encoder.get_input_embeddings().weight.detach()

    def token_init(self, word: str) -> torch.Tensor:
        """The input embedding of ``word`` (the mean over its tokens): a start for inversion."""
        ids = self._tokenize(word, add_special_tokens=False)
        if not ids:
            raise ValueError(f"{word!r} has no tokens")
        table = self.text_encoder.get_input_embeddings().weight.detach()
        return table[torch.tensor(ids, device=table.device)].mean(0).clone()

    def __init__(self, path: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str = torch.float32, *, height: int | None = None,
                 width: int | None = None, variant: str | None = None):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        path = Path(path).expanduser()
        device = torch.device(device)
        dtype = _check_dtype(device, dtype)
        _check_directory(path)
        self.path = path
        load = dict(local_files_only=True)
        weights = dict(load, variant=variant) if variant else load
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **weights)
        self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **weights)
        self.text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights)
        self.tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **load)
        alphas_cumprod, self.prediction_type = _load_alphas_cumprod(path)
        self.schedule = VPSchedule.from_alphas_cumprod(alphas_cumprod)

        self.text_encoder.to(dtype=dtype)  # diffusers models were loaded in dtype already
        for module in (unet, self.vae, self.text_encoder):
            module.to(device).eval().requires_grad_(False)
        self.unet = unet
        self.eps_fn = self._eps_module(unet)

        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        native = unet.config.sample_size * self.vae_scale_factor
        height, width = height or native, width or native
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"height and width must be multiples of {self.vae_scale_factor}; "
                             f"got {height}×{width}")
        f = self.vae_scale_factor
        self.latent_shape = (unet.config.in_channels, height // f, width // f)
        self.image_shape = (self.vae.config.out_channels, height, width)
        self.max_length = min(int(self.tokenizer.model_max_length),
                              self.text_encoder.config.max_position_embeddings)
        # Tokenizer and text encoder are shared by all requests: their calls take turns (a fast
        # tokenizer's settings and a textual-inversion hook must see only their own call).
        self._text_lock = threading.Lock()

    def _eps_module(self, unet) -> TextConditionalEps:
        if self.prediction_type == "epsilon":
            return TextConditionalEps(unet)
        if self.prediction_type == "v_prediction":
            return VPredictionEps(unet, self.schedule)
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r} in the scheduler "
                         "config (epsilon and v_prediction are)")

    # -- conditioning ---------------------------------------------------------------------------
    def _tokenize(self, texts, **kwargs) -> list[list[int]]:
        """The tokenizer, under the lock: a fast (Rust) tokenizer keeps its padding and truncation
        settings in shared state, so concurrent calls with different settings corrupt each other."""
        with self._text_lock:
            return self.tokenizer(texts, verbose=False, **kwargs).input_ids

    def _token_ids(self, texts: list[str]) -> torch.Tensor:
        ids = self._tokenize(texts, padding="max_length", max_length=self.max_length, truncation=True)
        return torch.tensor(ids, dtype=torch.long, device=self.text_encoder.device)

    def _text_embeddings(self, ids: torch.Tensor, substitute=None) -> torch.Tensor:
        """CLIP's last hidden state (SD's ``cond``), without ``no_grad``: differentiable on demand.

        ``substitute = (mask, embedding)`` replaces the input embeddings where ``mask`` (B, L, 1)
        is set, through a forward hook on the token-embedding layer that lives only for this call
        and acts only in this thread; the lock keeps this backend's other calls out meanwhile.
        """
        with self._text_lock:
            handle = None
            if substitute is not None:
                mask, embedding = substitute
                owner = threading.get_ident()

                def hook(module, args, output):
                    if threading.get_ident() == owner and output.shape[:-1] == mask.shape[:-1]:
                        return torch.where(mask, embedding.to(output.dtype), output)
                    return output

                handle = self.text_encoder.get_input_embeddings().register_forward_hook(hook)
            try:
                return self.text_encoder(input_ids=ids).last_hidden_state
            finally:
                if handle is not None:
                    handle.remove()

    def _uncond(self, batch: int, negative_prompt) -> torch.Tensor:
        texts = _broadcast("" if negative_prompt is None else negative_prompt, batch, "negative prompt")
        return self._text_embeddings(self._token_ids(texts))

    def encode(self, batch: int, *, prompt=None, labels=None, negative_prompt=None) -> Conditioning:
        """CLIP embeddings (B, max_length, hidden) of ``prompt`` and, as ``uncond``, of
        ``negative_prompt`` (default ``""``, SD's unconditional prompt).

        No ``no_grad`` inside: ``cond.requires_grad_()`` on the result makes the whole embedding
        a leaf to differentiate.
        """
        if labels is not None:
            raise ValueError("the diffusers backend is conditioned on text prompts, not class labels")
        texts = _broadcast("" if prompt is None else prompt, batch, "prompt")
        cond = self._text_embeddings(self._token_ids(texts))
        return Conditioning(cond, self._uncond(batch, negative_prompt))

    def _ids_with_placeholder(self, text: str, placeholder: str) -> tuple[list[int], list[int]]:
        """Token ids of ``text`` with one slot per ``placeholder``, and the slots' positions.

        The text between placeholders is tokenized on its own (CLIP splits words at spaces and
        punctuation anyway), so the resident tokenizer needs no new token.
        """
        tok = self.tokenizer
        parts = text.split(placeholder)
        if len(parts) < 2:
            raise ValueError(f"the prompt {text!r} does not contain the placeholder {placeholder!r}")
        slot_id = tok.bos_token_id  # any id: its embedding is replaced (not EOS, which CLIP pools)
        body, slots = [], []
        for k, part in enumerate(parts):
            if k:
                slots.append(len(body))
                body.append(slot_id)
            body += self._tokenize(part, add_special_tokens=False)
        room = self.max_length - 2
        if slots[-1] >= room:
            raise ValueError(f"the placeholder falls beyond the tokenizer's {self.max_length} "
                             f"tokens in {text!r}")
        ids = [tok.bos_token_id, *body[:room], tok.eos_token_id]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return ids + [pad] * (self.max_length - len(ids)), [s + 1 for s in slots]

    def encode_with_token(self, batch: int, prompt, token_embedding: torch.Tensor, *,
                          placeholder: str = "<*>", negative_prompt=None) -> Conditioning:
        """Textual inversion: ``prompt`` with ``placeholder`` standing for a learnable token.

        ``token_embedding`` (hidden_size,) becomes the input embedding at every placeholder slot
        and goes through the text encoder, so ``∂L/∂token_embedding`` comes out of
        ``loss.backward()`` (docs/design.md §2: "one new token's input embedding, through the
        encoder"; paper Appendix A). The tokenizer and the encoder's weights stay as they are.
        """
        hidden = self.text_encoder.get_input_embeddings().embedding_dim
        if not isinstance(token_embedding, torch.Tensor) or token_embedding.shape != (hidden,):
            raise ValueError(f"token_embedding must be a tensor of shape ({hidden},)")
        if not placeholder:
            raise ValueError("placeholder must be a non-empty string")
        texts = _broadcast(prompt, batch, "prompt")
        rows = [self._ids_with_placeholder(text, placeholder) for text in texts]
        device = self.text_encoder.device
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long, device=device)
        mask = torch.zeros(ids.shape + (1,), dtype=torch.bool, device=device)
        for b, (_, slots) in enumerate(rows):
            mask[b, slots] = True
        cond = self._text_embeddings(ids, (mask, token_embedding.to(device)))
        return Conditioning(cond, self._uncond(batch, negative_prompt))

    # -- decoding -------------------------------------------------------------------------------
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """SD latents → image in [0, 1] through the VAE decoder, differentiable (no ``no_grad``).

        A loss on latents skips this call, and with it the decoder's cost.
        """
        config = self.vae.config
        latents = x0.to(self.vae.dtype) / config.scaling_factor
        if getattr(config, "shift_factor", None) is not None:
            latents = latents + config.shift_factor
        image = self.vae.decode(latents).sample
        return (image / 2 + 0.5).clamp(0, 1)

    def style_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Activations of the VAE encoder's down blocks: an offline stand-in for VGG features."""
        encoder = self.vae.encoder
        h = encoder.conv_in(images.to(self.vae.dtype) * 2 - 1)
        feats = []
        for block in encoder.down_blocks:
            h = block(h)
            feats.append(h)
        return feats

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
