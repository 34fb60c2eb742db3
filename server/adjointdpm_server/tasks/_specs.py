"""What a task is asked to do, in plain Python (the service translates messages into these)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["GenerationSpec", "LossSpec", "TokenSpec", "ExampleSpec", "ConditionSpec"]


@dataclass
class GenerationSpec:
    model: str = ""
    adapter: str = ""
    prompt: list[str] = field(default_factory=list)
    negative_prompt: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    cond: torch.Tensor | None = None
    embedding: str = ""
    batch: int = 0
    seed: int | None = None
    x_T: torch.Tensor | None = None
    steps: int = 0
    solver: str = ""
    guidance_scale: float | None = None
    grid: str = ""
    t_start: float | None = None

    @property
    def has_client_numbers(self) -> bool:
        """The request brings its own tensors (a result that is not finite may be their doing)."""
        return self.x_T is not None or self.cond is not None or bool(self.embedding)


@dataclass
class LossSpec:
    """One weighted term: ``kind`` "client" (answered by the caller) or "server" (a plugin)."""

    kind: str
    name: str
    weight: float = 1.0
    domain: str = "image"
    params: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class TokenSpec:
    """The token a request learns or differentiates, its starting embedding decoded."""

    placeholder: str = "<*>"
    initializer: str = ""
    embedding: torch.Tensor | None = None


@dataclass
class ExampleSpec:
    seed: int | None = None
    x_T: torch.Tensor | None = None
    prompt: str = ""
    label: int | None = None


@dataclass
class ConditionSpec:
    """One entry of a fine-tune's prompt set: a prompt or a class label, drawn in proportion to
    ``weight`` (relative; 0 = never, though the wire reads an unset weight 0 as 1)."""

    prompt: str = ""
    label: int | None = None
    weight: float = 1.0
