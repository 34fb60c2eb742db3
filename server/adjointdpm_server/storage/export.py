"""Artifacts in the layouts other tools load (``GetArtifact(format="diffusers")``).

- a LoRA adapter of a Stable Diffusion 1.x/2.x model → the file ``pipe.load_lora_weights()``
  takes: written by diffusers' own ``save_lora_weights`` (``unet.``-prefixed peft keys, no adapter
  name) with the adapter's rank, alpha and target modules as its ``lora_adapter_metadata``;
- a learned token → the file ``pipe.load_textual_inversion()`` takes: one tensor named by the
  token string (the placeholder it was learned under).

``native`` (the default) is the stored file itself, for round trips into the service.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..errors import FailedPrecondition, InvalidArgument

__all__ = ["FORMATS", "export"]

FORMATS = ("native", "diffusers")


def export(info, path: Path, backend, fmt: str) -> bytes:
    """The bytes of artifact ``info`` (stored at ``path``) in ``fmt``; ``backend`` is its model's."""
    fmt = fmt or "native"
    if fmt not in FORMATS:
        raise InvalidArgument(f"unknown artifact format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "native":
        return path.read_bytes()
    if backend is None or backend.family != "sd":
        family = "not served here" if backend is None else f"a {backend.family} model"
        raise FailedPrecondition(f"the diffusers format covers adapters and tokens of Stable Diffusion "
                                 f"1.x/2.x models; {info.id}'s model {info.model!r} is {family}")
    from safetensors.torch import load_file

    state = load_file(str(path))
    if info.kind == "lora":
        return _lora(state, info.metadata)
    if info.kind == "embedding" and set(state) == {"token"}:
        return _token(state["token"], info.metadata.get("placeholder") or "<*>")
    raise FailedPrecondition(f"{info.id} is a {info.kind} artifact: only LoRA adapters and learned "
                             "tokens have a diffusers format")


def _lora(state: dict, meta: dict) -> bytes:
    from diffusers import StableDiffusionPipeline

    layers = {}
    for key, value in state.items():
        if not key.startswith("unet.") or ".default." not in key:
            raise FailedPrecondition(f"adapter tensor {key!r} is not a LoRA weight of the UNet")
        # the service's eps_fn holds the UNet as `unet`; diffusers adds that prefix itself
        layers[key[len("unet."):].replace(".default.", ".")] = value
    rank = int(meta.get("rank") or 0)
    config = {"r": rank, "lora_alpha": float(meta.get("alpha") or rank),
              "target_modules": list(meta.get("targets") or [])}
    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers,
                                                  unet_lora_adapter_metadata=config,
                                                  weight_name="adapter.safetensors")
        return (Path(tmp) / "adapter.safetensors").read_bytes()


def _token(vector, placeholder: str) -> bytes:
    from safetensors.torch import save

    return save({placeholder: vector.detach().to("cpu").contiguous()})
