"""Model backends behind one interface (docs/design.md §4), resolved from a spec string.

    load_model("digits")                     # the embedded default (weights ship with the repo)
    load_model("digits-flow")                # the same network as a rectified flow (velocity)
    load_model("gaussian-mixture")           # the analytic oracle
    load_model("diffusers:/models/sd-1.5")   # Stable Diffusion from a local diffusers directory
"""

from __future__ import annotations

import torch

from ._base import Conditioning, ModelBackend

__all__ = ["Conditioning", "ModelBackend", "MODELS", "load_model"]


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


def _diffusers(arg, **kw):
    from ._diffusers import StableDiffusionBackend

    if not arg:
        raise ValueError("diffusers needs a local directory: --model diffusers:/path/to/pipeline")
    return StableDiffusionBackend(arg, **kw)


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
