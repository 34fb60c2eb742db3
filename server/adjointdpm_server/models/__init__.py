"""Model backends behind one interface (docs/design.md §4), resolved from a spec string.

    load_model("digits")                     # the embedded default (weights ship with the repo)
    load_model("digits-flow")                # the same network as a rectified flow (velocity)
    load_model("gaussian-mixture")           # the analytic oracle
    load_model("diffusers:/models/sd-1.5")   # Stable Diffusion from a local diffusers directory
    load_model("diffusers:/models/sdxl")     # … SDXL, SD3-type, FLUX-type: model_index.json says which
    load_model("diffusers:/models/flux?height=512&width=768")   # options after "?"
"""

from __future__ import annotations

import torch

from ._bank import AdapterBank, AdapterSpec, AdapterView
from ._base import Conditioning, ModelBackend
from ._precision import PrecisionUnsupported, check_precision

__all__ = ["AdapterBank", "AdapterSpec", "AdapterView", "Conditioning", "ModelBackend", "MODELS", "load_model", "PrecisionUnsupported",
           "check_precision"]


def _digits(arg, **kw):
    from ._digits import DIGITS_WEIGHTS, DigitsBackend

    return DigitsBackend(arg or DIGITS_WEIGHTS, **kw)


def _digits_flow(arg, **kw):
    from ._digits import DIGITS_FLOW_WEIGHTS, DigitsFlowBackend

    return DigitsFlowBackend(arg or DIGITS_FLOW_WEIGHTS, **kw)


def _gaussian(arg, **kw):
    from ._gaussian import GaussianMixtureBackend

    if arg:
        raise ValueError("gaussian-mixture takes no argument")
    return GaussianMixtureBackend(**kw)


OPTIONS = {"height": int, "width": int, "max_sequence_length": int, "variant": str}


def _options(arg: str) -> tuple[str, dict]:
    """``/path?height=512&width=512`` → the path and the backend's keyword options."""
    from urllib.parse import parse_qsl

    if "?" not in arg:
        return arg, {}
    arg, _, query = arg.rpartition("?")
    options = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=True):
        if key not in OPTIONS:
            raise ValueError(f"unknown model option {key!r}; choose from {', '.join(OPTIONS)}")
        try:
            options[key] = OPTIONS[key](value)
        except ValueError:
            raise ValueError(f"model option {key}={value!r} is not a valid {OPTIONS[key].__name__}") from None
        if OPTIONS[key] is int and not 1 <= options[key] <= 16384:
            raise ValueError(f"model option {key} must lie in 1…16384; got {options[key]}")
    return arg, options


# The pipeline class model_index.json names → the module and backend class of that family.
FAMILIES = {
    "StableDiffusionPipeline": ("._diffusers", "StableDiffusionBackend"),
    "StableDiffusionXLPipeline": ("._sdxl", "SDXLBackend"),
    "StableDiffusion3Pipeline": ("._sd3", "SD3Backend"),
    "FluxPipeline": ("._flux", "FluxBackend"),
}


def _diffusers(arg, **kw):
    """The family is the pipeline class in ``model_index.json`` (Stable Diffusion without one)."""
    import importlib
    import inspect
    from pathlib import Path

    from ._latent import pipeline_class

    if not arg:
        raise ValueError("diffusers needs a local directory: --model diffusers:/path/to/pipeline")
    arg, options = _options(arg)
    kw.update(options)
    path = Path(arg).expanduser()
    cls = (pipeline_class(path) if path.is_dir() else None) or "StableDiffusionPipeline"
    if cls not in FAMILIES:
        raise ValueError(f"{arg!r} holds a {cls}; supported pipelines: {', '.join(FAMILIES)}")
    module, name = FAMILIES[cls]
    backend = getattr(importlib.import_module(module, __name__), name)
    takes = inspect.signature(backend).parameters
    refused = [k for k in options if k not in takes]
    if refused:
        raise ValueError(f"a {cls} takes no option {', '.join(refused)}")
    return backend(path, **kw)


MODELS = {"digits": _digits, "digits-flow": _digits_flow, "gaussian-mixture": _gaussian,
          "diffusers": _diffusers}


def load_model(spec: str = "digits", *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> ModelBackend:
    """The backend named by ``spec`` (``name`` or ``name:argument``), loaded from local files only."""
    name, _, arg = spec.partition(":")
    factory = MODELS.get(name)
    if factory is None:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return factory(arg or None, device=device, dtype=dtype)
