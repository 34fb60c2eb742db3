"""The server-side loss plugin interface (docs/design.md §4: named plugins with JSON-like parameters
and tensor inputs, discovered through the entry-point group ``adjointdpm.losses``)."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch

from ..errors import InvalidArgument

__all__ = ["LossContext", "LossPlugin"]


@dataclass
class LossContext:
    """What a plugin may use besides its parameters.

    ``backend``: the resident model (its classifier, VAE, …); ``settings``: server configuration
    such as ``triton_url`` or ``clip_model_dir``; ``reference``: the images (or latents) the same
    request produces with the unmodified model and starting noise, for content terms.
    """

    backend: Any
    settings: Mapping[str, Any] = field(default_factory=dict)
    reference: torch.Tensor | None = None


class LossPlugin(abc.ABC):
    """One loss term: built per request, then called on x → the loss of each sample, shape (B,),
    differentiable in x.

    ``x`` is the decoded image in [0, 1], shape (B, C, H, W) (``domain = "image"``), or ``x_0``
    itself (``"latent"``). The request's objective is the weighted sum over terms and samples
    (docs/design.md §4.3), so a sample's gradient does not depend on the batch it shares.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    params: ClassVar[Mapping[str, str]] = {}   # parameter name → what it means
    tensors: ClassVar[Mapping[str, str]] = {}  # tensor input name → what it is
    domain: ClassVar[str] = "image"

    def __init__(self, context: LossContext, params: Mapping[str, Any],
                 tensors: Mapping[str, torch.Tensor]):
        unknown = (set(params) - set(self.params)) | (set(tensors) - set(self.tensors))
        if unknown:
            raise InvalidArgument(f"loss {self.name!r} does not take {', '.join(sorted(unknown))}; "
                                  f"parameters: {', '.join(self.params) or 'none'}; "
                                  f"tensors: {', '.join(self.tensors) or 'none'}")
        self.context = context

    @classmethod
    def available(cls, settings: Mapping[str, Any]) -> bool:
        """Whether the server's configuration lets this plugin run (e.g. a CLIP directory)."""
        return True

    @abc.abstractmethod
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The loss of each sample of ``x``, shape (B,)."""

    # helpers for subclasses ----------------------------------------------------------------
    @staticmethod
    def number(params: Mapping[str, Any], key: str, default: float, *, low: float | None = None,
               high: float | None = None) -> float:
        value = params.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgument(f"parameter {key!r} must be a number; got {value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise InvalidArgument(f"parameter {key!r} must lie in [{low}, {high}]; got {value}")
        return float(value)
