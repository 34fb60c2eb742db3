"""Server-side loss plugins and their registry (entry-point group ``adjointdpm.losses``).

Built in: ``mse``, ``gram_style``, ``classifier``, ``clip_similarity`` (when a local CLIP
directory is configured) and ``triton`` (a model on a Triton Inference Server returns loss and
gradient). A third-party package adds its own by declaring, in its pyproject.toml::

    [project.entry-points."adjointdpm.losses"]
    my_loss = "my_package.losses:MyLoss"      # a LossPlugin subclass
"""

from __future__ import annotations

import logging
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any, Mapping

import torch

from ..errors import InvalidArgument
from ._base import CONDITION_KINDS, Conditions, LossContext, LossPlugin
from ._remote import LossAnswer, RemoteLoss, check_reply

__all__ = ["LossContext", "LossPlugin", "Conditions", "CONDITION_KINDS", "RemoteLoss", "LossAnswer",
           "check_reply", "discover_losses", "available_losses", "build_loss"]

GROUP = "adjointdpm.losses"
log = logging.getLogger("adjointdpm.losses")


@lru_cache(maxsize=1)
def discover_losses() -> dict[str, type[LossPlugin]]:
    """Every plugin installed under the entry-point group, by name; a plugin that fails to load
    is logged and left out (one broken package must not take the server down)."""
    found = {}
    for ep in entry_points(group=GROUP):
        try:
            cls = ep.load()
        except Exception as err:  # noqa: BLE001
            log.warning("loss plugin %s (%s) failed to load: %s", ep.name, ep.value, err)
            continue
        if not (isinstance(cls, type) and issubclass(cls, LossPlugin)):
            log.warning("loss plugin %s (%s) is not a LossPlugin subclass; ignored", ep.name, ep.value)
            continue
        found[ep.name] = cls
    return dict(sorted(found.items()))


def available_losses(settings: Mapping[str, Any]) -> dict[str, type[LossPlugin]]:
    """The plugins this server's configuration can run."""
    return {name: cls for name, cls in discover_losses().items() if cls.available(settings)}


def build_loss(name: str, context: LossContext, params: Mapping[str, Any] | None = None,
               tensors: Mapping[str, torch.Tensor] | None = None) -> LossPlugin:
    plugins = available_losses(context.settings)
    cls = plugins.get(name)
    if cls is None:
        raise InvalidArgument(f"unknown loss {name!r}; this server offers: {', '.join(plugins)}")
    return cls(context, dict(params or {}), dict(tensors or {}))
