"""What every text-conditioned latent model from a diffusers directory shares (docs/design.md §4.2).

Stable Diffusion 1.x/2.x, SDXL, SD3-type and FLUX-type backends differ in their denoiser, their
text encoders and how those outputs are packed into ``cond``; they share the rest, here: local
loading with no hub access, dtype rules, image size, VAE decoding, style features, and a learned
token that enters *every* text encoder (its embedding is the concatenation of one input embedding
per encoder, in the order of ``text_encoders``; paper Appendix A).
"""

from __future__ import annotations

import abc
import dataclasses
import json
import threading
from pathlib import Path

import torch

from ..core import HALF_DTYPES, VPSchedule
from ..errors import ResourceExhausted
from ._base import Conditioning, ModelBackend
from ._decoding import (PLAIN, Checkpointing, DecodePlan, DecoderGraph, SlicedDecode, checkpointed_decoder,
                        gate_decoder, measure, plan_decode)
from ._text import TextEncoder, broadcast
from ._tiling import TiledDecode, check_tile

__all__ = ["LatentDiffusionBackend", "check_dtype", "check_directory", "pipeline_class",
           "load_vp_schedule", "VP_PREDICTIONS", "vae_dtype"]


def vae_dtype(force_upcast: bool, dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype: float32 where the server runs float16 and the VAE's config says
    ``force_upcast`` (SDXL's VAE overflows in float16: diffusers' pipelines upcast it too), else
    the server's."""
    return torch.float32 if dtype == torch.float16 and force_upcast else dtype


def check_dtype(device: torch.device, dtype) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype; got {dtype!r}")
    if device.type == "cpu" and dtype in HALF_DTYPES:
        raise ValueError(f"{dtype} needs a GPU: on the CPU diffusers models run in torch.float32 "
                         "(or float64); pass device='cuda' for float16/bfloat16")
    return dtype


def check_directory(path: Path, parts, family: str) -> None:
    """Fail early and clearly: a path that does not exist must not be mistaken for a hub repo id."""
    if not path.is_dir():
        raise FileNotFoundError(f"{family} directory {str(path)!r} does not exist (the "
                                "diffusers backend loads local directories only, never a hub)")
    missing = [p for p in parts if not (path / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"{str(path)!r} is not a diffusers {family} directory: "
                                f"missing {', '.join(p + '/' for p in missing)}")


def pipeline_class(path: Path) -> str | None:
    """The pipeline class ``model_index.json`` names (None when there is no such file)."""
    index = path / "model_index.json"
    if not index.is_file():
        return None
    try:
        return str(json.loads(index.read_text()).get("_class_name", ""))
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{str(index)!r} is not a valid model_index.json: {err}") from None


def component(path: Path, name: str) -> str | None:
    """The class ``model_index.json`` names for an optional component (None when it is absent)."""
    index = path / "model_index.json"
    if not index.is_file():
        return None
    entry = json.loads(index.read_text()).get(name)
    return entry[1] if isinstance(entry, list) and len(entry) == 2 and entry[1] else None


class LatentDiffusionBackend(ModelBackend):
    """A frozen, resident diffusers pipeline whose ``x_0`` is a VAE latent and whose conditioning
    comes from one or more text encoders. Subclasses load the parts, set ``text_encoders``,
    ``vae``, ``latent_shape``/``image_shape`` and implement :meth:`_embed` (texts → ``cond``)."""

    conditioning = "prompt"
    has_text_encoder = True
    has_embedding_table = True
    text_encoders: list[TextEncoder]

    # -- conditioning ---------------------------------------------------------------------------
    @abc.abstractmethod
    def _embed(self, texts: list[str], token=None) -> torch.Tensor:
        """``cond`` (B, *cond_shape) for ``texts``; ``token = (embedding, placeholder)`` puts a
        learned token at every placeholder, in every text encoder."""

    def _uncond(self, batch: int, negative_prompt) -> torch.Tensor | None:
        """The unconditional ``cond`` for CFG: the negative prompt's, ``""`` by default."""
        return self._embed(broadcast("" if negative_prompt is None else negative_prompt, batch,
                                     "negative prompt"))

    def encode(self, batch: int, *, prompt=None, labels=None, negative_prompt=None) -> Conditioning:
        """``cond`` of ``prompt`` and, as ``uncond``, of ``negative_prompt``. No ``no_grad``
        inside: ``cond.requires_grad_()`` on the result makes the whole embedding a leaf."""
        if labels is not None:
            raise ValueError(f"the {self.family} backend is conditioned on text prompts, not class labels")
        cond = self._embed(broadcast("" if prompt is None else prompt, batch, "prompt"))
        return Conditioning(cond, self._uncond(batch, negative_prompt))

    def encode_with_token(self, batch: int, prompt, token_embedding: torch.Tensor, *,
                          placeholder: str = "<*>", negative_prompt=None) -> Conditioning:
        """Textual inversion: ``prompt`` with ``placeholder`` standing for a learnable token whose
        input embeddings go through every text encoder, so ``∂L/∂token_embedding`` comes out of
        ``loss.backward()``. The tokenizers and the encoders' weights stay as they are."""
        if not isinstance(token_embedding, torch.Tensor) or token_embedding.shape != (self.token_dim,):
            raise ValueError(f"token_embedding must be a tensor of shape ({self.token_dim},)")
        if not placeholder:
            raise ValueError("placeholder must be a non-empty string")
        texts = broadcast(prompt, batch, "prompt")
        cond = self._embed(texts, (token_embedding, placeholder))
        return Conditioning(cond, self._uncond(batch, negative_prompt))

    def _token_pieces(self, token) -> list:
        """One ``(embedding, placeholder)`` per text encoder (or Nones)."""
        if token is None:
            return [None] * len(self.text_encoders)
        embedding, placeholder = token
        pieces = embedding.split([e.width for e in self.text_encoders])
        return [(piece, placeholder) for piece in pieces]

    @staticmethod
    def _run(encoder: TextEncoder, texts: list[str], token, **kwargs):
        """One encoder's output for ``texts``, with the learned token substituted if given."""
        if token is None:
            return encoder(encoder.ids(texts), **kwargs)
        embedding, placeholder = token
        ids, mask = encoder.ids_with_placeholder(texts, placeholder)
        return encoder(ids, (mask, embedding.to(encoder.device)), **kwargs)

    @property
    def token_dim(self) -> int:
        return sum(e.width for e in self.text_encoders)

    def token_init(self, word: str) -> torch.Tensor:
        """The input embedding of ``word`` (the mean over its tokens) in every encoder."""
        return torch.cat([e.token_init(word).to(self.dtype) for e in self.text_encoders])

    def random_token(self, seed: int = 0) -> torch.Tensor:
        """A random start for a learned token, at each encoder's embedding scale."""
        gen = torch.Generator().manual_seed(seed)
        parts = [torch.randn(e.width, generator=gen).to(e.table()) * e.table().std()
                 for e in self.text_encoders]
        return torch.cat([p.to(self.dtype) for p in parts])

    def embedding_table(self) -> torch.Tensor:
        """The encoders' token input embeddings side by side (what a new token joins). Encoders
        with different vocabularies (CLIP and T5) are cut to the smaller one: the priors use
        per-dimension statistics, which do not depend on how rows pair up."""
        tables = [e.table().to(self.dtype) for e in self.text_encoders]
        rows = min(t.shape[0] for t in tables)
        return torch.cat([t[:rows] for t in tables], dim=1)

    # -- decoding -------------------------------------------------------------------------------
    plans_decoder = True

    def decode(self, x0: torch.Tensor, plan: DecodePlan | None = None) -> torch.Tensor:
        """Latents → image in [0, 1] through the VAE decoder, differentiable (no ``no_grad``);
        ``plan`` (``plan_decoder``): in slices recomputed in the backward pass, checkpointed
        inside or not; by default the whole batch at once. A loss on latents skips this call, and
        with it the decoder's cost."""
        plan = plan or PLAIN
        if plan.tile:  # approximate, by request: tiles blended at the seams (models/_tiling.py)
            return self._image(TiledDecode.apply(self._latents(x0), self.vae, plan), x0.dtype)
        if plan.slice_size:
            return SlicedDecode.apply(x0, self._decode, plan)
        with checkpointed_decoder(plan.checkpointing):  # the whole batch's graph, checkpointed or not
            return self._decode(x0)

    def _decode(self, x0: torch.Tensor) -> torch.Tensor:
        return self._image(self.vae.decode(self._latents(x0)).sample, x0.dtype)

    def _latents(self, x0: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        latents = x0.to(self.vae.dtype) / config.scaling_factor  # float32 under force_upcast
        if getattr(config, "shift_factor", None) is not None:
            latents = latents + config.shift_factor
        return latents

    @staticmethod
    def _image(decoded: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (decoded / 2 + 0.5).clamp(0, 1).to(dtype)

    def decoder_graph(self, tile: int = 0) -> DecoderGraph:
        """One sample's decoder graph at this backend's latent shape (or one ``tile``'s, a side in
        latent pixels), measured once per shape (not kept)."""
        channels, h, w = self.latent_shape
        shape = (channels, min(tile, h), min(tile, w)) if tile else tuple(self.latent_shape)
        known = self._decoder_graphs.get(shape)
        if known is not None:  # measured: no wait behind another shape's measurement
            return known
        with self._decoder_lock:
            if shape not in self._decoder_graphs:
                x = torch.zeros((1, *shape), dtype=self.dtype, device=self.device)
                self._decoder_graphs[shape] = measure(self._decode, x, self.vae.decoder)
            return self._decoder_graphs[shape]

    def plan_decoder(self, batch: int, budget: float | None, tile: int = 0) -> DecodePlan:
        """The decoder's plan for an image-domain gradient of ``batch`` samples within ``budget``
        bytes (None: none) — in tiles of ``tile`` latent pixels when the request asks (approximate;
        a tile the image fits in decodes it whole) — or RESOURCE_EXHAUSTED naming the decoder when
        no plan fits."""
        if tile:
            check_tile(tile)
        asked = tile
        if tile >= max(self.latent_shape[-2:]):
            tile = 0  # diffusers does not tile what fits one tile: the whole image, exact
        if budget is None:
            return DecodePlan(tile=tile)
        graph = self.decoder_graph(tile)
        plan = plan_decode(graph, batch, budget)
        if plan is None:
            mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
            h, w = self.image_shape[-2:]
            lh, lw = (min(tile, side) for side in self.latent_shape[-2:])
            what = f"one {h}x{w} image's" if not tile else f"one {lh}x{lw}-latent tile's"
            raise ResourceExhausted(
                f"the VAE decoder's gradient does not fit: {what} decoder graph is "
                f"{mib(graph.at(Checkpointing.FINE))} even checkpointed inside ({mib(graph.plain)} plain), over "
                f"the gradient memory budget of {mib(budget)}; use a loss on the latents, a smaller "
                "image" + ("" if asked else ", tiled decoding (decoder_tile, approximate)") + ", or a "
                "larger budget (memory_budget_mib cannot raise the server's --grad-memory-mib)")
        return dataclasses.replace(plan, tile=tile)

    def style_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Activations of the VAE encoder's down blocks: an offline stand-in for VGG features."""
        encoder = self.vae.encoder
        h = encoder.conv_in(images.to(self.vae.dtype) * 2 - 1)
        feats = []
        for block in encoder.down_blocks:
            h = block(h)
            feats.append(h)
        return feats

    # -- loading helpers ------------------------------------------------------------------------
    parts: tuple[str, ...] = ()  # the subfolders the directory must have
    title: str = ""  # the family's name in messages

    def _open(self, path, device, dtype, variant) -> tuple[torch.device, torch.dtype]:
        """Check the directory and the dtype before loading anything; local files only from here."""
        self.path = Path(path).expanduser()
        device = torch.device(device)
        dtype = check_dtype(device, dtype)
        check_directory(self.path, self.parts, self.title)
        self._weights = dict(local_files_only=True, **({"variant": variant} if variant else {}))
        return device, dtype

    def _vae(self, cls, dtype: torch.dtype):
        """The VAE in ``vae_dtype``, its decoder's blocks gated for checkpointing (off until a
        decoder plan turns it on, ``_decoding``)."""
        config = cls.load_config(self.path, subfolder="vae", local_files_only=True)
        vae = self._part(cls, "vae", vae_dtype(bool(config.get("force_upcast", False)), dtype))
        gate_decoder(vae.decoder)
        self._decoder_lock, self._decoder_graphs = threading.Lock(), {}
        return vae

    def _part(self, cls, subfolder: str, dtype: torch.dtype | None = None):
        """A part with weights (diffusers models load in ``dtype``; transformers ones are cast)."""
        kwargs = dict(self._weights, **({"torch_dtype": dtype} if dtype is not None else {}))
        return cls.from_pretrained(self.path, subfolder=subfolder, **kwargs)

    def _tokenizer(self, cls, subfolder: str):
        return cls.from_pretrained(self.path, subfolder=subfolder, local_files_only=True)

    def _image_size(self, native: int, height: int | None, width: int | None, multiple: int):
        height, width = height or native, width or native
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}; got {height}×{width}")
        return height, width

    @staticmethod
    def _freeze(device, *modules) -> None:
        for module in modules:
            module.to(device).eval().requires_grad_(False)


# diffusers' ``prediction_type`` → what the core converts (core/_prediction.py): SD 1.x/2.x and SDXL
# declare it as ``prediction``, so there is one v path, the sampler's
VP_PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v"}


def load_vp_schedule(path: Path):
    """The VP path (ᾱ_n) and the prediction (core name) that ``scheduler/`` describes, through the
    scheduler class it names.

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
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in VP_PREDICTIONS:
        raise ValueError(f"unsupported prediction_type {prediction_type!r} in the scheduler config "
                         f"({' and '.join(VP_PREDICTIONS)} are)")
    return VPSchedule.from_alphas_cumprod(alphas_cumprod), VP_PREDICTIONS[prediction_type]


def load_flow_schedule(path: Path, image_seq_len: int):
    """The rectified-flow path a ``FlowMatchEulerDiscreteScheduler`` config describes, from
    t = 0.999 (y = x/α needs α > 0) to the clean end t = 0. Its shift is the config's ``shift``, or
    with ``use_dynamic_shifting`` the one diffusers' SD3/FLUX pipelines compute from the image's
    token count (``calculate_shift``: μ linear in the count; exponential time shift = shift e^μ).
    """
    import math

    from diffusers import FlowMatchEulerDiscreteScheduler

    from ..core import FlowSchedule

    config = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler",
                                                            local_files_only=True).config
    unsupported = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                               "invert_sigmas", "stochastic_sampling", "shift_terminal")
                   if config.get(k)]
    if unsupported:
        raise ValueError(f"the scheduler config sets {', '.join(unsupported)}: only the plain "
                         "(optionally shifted) rectified-flow time grid is supported")
    shift = float(config.get("shift", 1.0))
    if config.get("use_dynamic_shifting"):
        base, top = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        lo, hi = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        mu = lo + (hi - lo) * (image_seq_len - base) / (top - base)
        shift = math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu
    return FlowSchedule.rectified(shift=shift, t_min=0.0, t_max=0.999)


def class_for(path: Path, subfolder: str, fallback: str):
    """The transformers class ``model_index.json`` names for a component (T5's may vary)."""
    import transformers

    name = component(path, subfolder) or fallback
    cls = getattr(transformers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"model_index.json names {name!r} for {subfolder}, which transformers lacks")
    return cls
