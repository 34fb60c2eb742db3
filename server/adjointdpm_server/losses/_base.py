"""The server-side loss plugin interface (docs/design.md §4: named plugins with JSON-like parameters
and tensor inputs, discovered through the entry-point group ``adjointdpm.losses``)."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch

from ..errors import InvalidArgument

__all__ = ["LossContext", "LossPlugin", "Conditions", "CONDITION_KINDS"]

CONDITION_KINDS = ("none", "prompts", "labels")


@dataclass(frozen=True)
class Conditions:
    """What each sample of a batch was generated from: ``kind`` "prompts" (``values``: one str per
    sample), "labels" (one int per sample) or "none" (a tensor conditioning, a learned embedding or
    token, unconditional: ``values`` empty)."""

    kind: str = "none"
    values: tuple = ()

    def __post_init__(self):
        if self.kind not in CONDITION_KINDS:
            raise ValueError(f"conditions are one of {', '.join(CONDITION_KINDS)}; got {self.kind!r}")
        values = tuple(self.values)
        kind_of = {"prompts": str, "labels": int}.get(self.kind)
        if kind_of is None and values:
            raise ValueError("conditions of kind 'none' carry no values")
        if kind_of is not None and not all(isinstance(v, kind_of) and not isinstance(v, bool)
                                           for v in values):
            raise ValueError(f"{self.kind} conditions must all be {kind_of.__name__}s")
        object.__setattr__(self, "values", values)

    def rows(self, index) -> "Conditions":
        """The conditions of rows ``index``: a slice, or a sequence or 1-d tensor of row numbers
        (as the batch's tensors are indexed)."""
        if self.kind == "none":
            return self
        if isinstance(index, slice):
            return Conditions(self.kind, self.values[index])
        rows = index.tolist() if isinstance(index, torch.Tensor) else list(index)
        return Conditions(self.kind, tuple(self.values[int(i)] for i in rows))


_GENERATED_FROM = {"prompts": "prompts", "labels": "class labels",
                   "none": "no prompt or label (a tensor or learned conditioning, a prompt holding a "
                           "learned token's placeholder, or none)"}


@dataclass
class LossContext:
    """What a plugin may use besides its parameters.

    ``backend``: the resident model (its classifier, VAE, …); ``settings``: server configuration
    such as ``triton_url`` or ``clip_model_dir``; ``reference``: the images (or latents) the same
    request produces with the unmodified model and starting noise, for content terms.

    ``condition_kind``: what the request's samples are generated from — "prompts", "labels" or
    "none" (``Conditions``) — fixed when the plugin is built, so a plugin that needs a sample's
    own prompt or label can refuse a request without them before any work. ``conditions``: the
    values for the batch being scored (one per sample), set by the task before each call like
    ``reference`` (a fine-tune's batch changes every iteration and pass); read them through
    ``prompts(n)`` / ``labels(n)``.
    """

    backend: Any
    settings: Mapping[str, Any] = field(default_factory=dict)
    reference: torch.Tensor | None = None
    condition_kind: str = "none"
    conditions: tuple | None = None

    def prompts(self, batch: int) -> list[str]:
        """The generation prompt of each of the ``batch`` samples being scored."""
        return list(self._own("prompts", batch))

    def labels(self, batch: int) -> list[int]:
        """The class label each of the ``batch`` samples being scored was generated with."""
        return list(self._own("labels", batch))

    def require_own(self, kind: str, plugin: str, param: str, what: str) -> None:
        """Refuse, before any work, a plugin left without ``param`` on samples that have no
        ``kind`` ("prompts" or "labels") of their own: it would have nothing to score against.
        ``what``: the parameter's form, for the message."""
        if self.condition_kind != kind:
            raise InvalidArgument(f"{plugin} needs the parameter {param!r} ({what}) when the samples "
                                  f"have no {kind} of their own: this request's are generated from "
                                  f"{_GENERATED_FROM[self.condition_kind]}")

    def _own(self, kind: str, batch: int) -> tuple:
        # A mismatch here is the server's bug (the task did not set this batch's conditions,
        # or a plugin that checked ``condition_kind`` at build asks for another kind): a plain
        # exception, which the service logs with its traceback and answers INTERNAL.
        if self.condition_kind != kind:
            raise RuntimeError(f"the samples have no {kind} of their own (their conditions are "
                               f"{self.condition_kind!r})")
        if self.conditions is None or len(self.conditions) != batch:
            got = "none" if self.conditions is None else len(self.conditions)
            raise RuntimeError(f"the task set {got} {kind} for a batch of {batch}")
        return self.conditions


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

    @property
    def uses_reference(self) -> bool:
        """Whether this term, as built, reads ``context.reference`` (declared, never probed): a
        task that has no reference for a batch (a fine-tune over a prompt set) computes one only
        for the terms that say so."""
        return False

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
