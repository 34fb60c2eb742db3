"""Artifacts at rest: adapters, embeddings, weight gradients and checkpoints as safetensors files
with their sidecars, scoped by tenant and bounded by quotas (``artifacts``), and their exports
in other tools' layouts (``export``)."""

from .artifacts import ArtifactInfo, ArtifactStore
from .export import export

__all__ = ["ArtifactInfo", "ArtifactStore", "export"]
