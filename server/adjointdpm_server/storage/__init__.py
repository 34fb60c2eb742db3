"""Artifacts at rest: adapters, embeddings, weight gradients and checkpoints as safetensors files
with their descriptions, in a directory or an S3-compatible bucket (``_blobs``, ``_s3``), scoped
by tenant and bounded by cluster-wide quotas (``artifacts``), and their exports in other tools'
layouts (``export``)."""

from .artifacts import ArtifactInfo, ArtifactStore
from .export import export

__all__ = ["ArtifactInfo", "ArtifactStore", "export"]
