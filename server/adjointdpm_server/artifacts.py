"""Artifacts: adapters, embeddings, weight gradients and checkpoints as safetensors files.

Each artifact is ``<root>/<id>.safetensors`` with its description in the file's metadata and in a
``<id>.json`` beside it (for listing without opening the tensors). IDs are ``<kind>-<32 hex>``:
anything else is refused before it can name a path.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import InvalidArgument, NotFound

__all__ = ["ArtifactInfo", "ArtifactStore", "KINDS"]

KINDS = ("lora", "full", "embedding", "weight_gradients", "checkpoint")
_ID = re.compile(r"^(%s)-[0-9a-f]{32}$" % "|".join(KINDS))


@dataclass
class ArtifactInfo:
    id: str
    kind: str
    model: str
    size: int = 0
    name: str = ""
    iteration: int = 0
    created: float = 0.0
    metadata: dict = field(default_factory=dict)


class ArtifactStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def save(self, kind: str, tensors: dict[str, torch.Tensor], *, model: str, name: str = "",
             iteration: int = 0, metadata: dict | None = None) -> ArtifactInfo:
        """Write atomically (temporary file, then rename): a crash leaves no half artifact."""
        from safetensors.torch import save_file

        if kind not in KINDS:
            raise ValueError(f"unknown artifact kind {kind!r}")
        info = ArtifactInfo(id=f"{kind}-{uuid.uuid4().hex}", kind=kind, model=model, name=name,
                            iteration=iteration, created=time.time(), metadata=dict(metadata or {}))
        path = self.root / f"{info.id}.safetensors"
        tmp = path.with_suffix(".tmp")
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(tensors, str(tmp), metadata={"adjointdpm": json.dumps(asdict(info))})
        info.size = tmp.stat().st_size
        os.replace(tmp, path)
        sidecar = self.root / f"{info.id}.json"
        sidecar.with_suffix(".json.tmp").write_text(json.dumps(asdict(info)))
        os.replace(sidecar.with_suffix(".json.tmp"), sidecar)
        return info

    def _check_id(self, artifact_id: str) -> None:
        if not isinstance(artifact_id, str) or not _ID.match(artifact_id):
            raise InvalidArgument(f"{artifact_id!r} is not an artifact id (expected <kind>-<32 hex>)")

    def path(self, artifact_id: str) -> Path:
        self._check_id(artifact_id)
        path = self.root / f"{artifact_id}.safetensors"
        if not path.exists():
            raise NotFound(f"no artifact {artifact_id!r} on this server")
        return path

    def info(self, artifact_id: str) -> ArtifactInfo:
        self.path(artifact_id)
        try:
            data = json.loads((self.root / f"{artifact_id}.json").read_text())
        except (OSError, ValueError) as err:  # expired meanwhile, or a damaged sidecar
            raise NotFound(f"no artifact {artifact_id!r} on this server") from err
        return ArtifactInfo(**data)

    def load(self, artifact_id: str, device="cpu") -> tuple[dict[str, torch.Tensor], ArtifactInfo]:
        from safetensors.torch import load_file

        path = self.path(artifact_id)
        return load_file(str(path), device=str(device)), self.info(artifact_id)

    def expire(self, retention_s: float) -> list[str]:
        """Delete artifacts older than ``retention_s`` seconds (0 = keep all); returns their ids."""
        if not retention_s or retention_s <= 0:
            return []
        cutoff, gone = time.time() - retention_s, []
        for info in self.list():
            if info.created < cutoff:
                for suffix in (".safetensors", ".json"):
                    (self.root / f"{info.id}{suffix}").unlink(missing_ok=True)
                gone.append(info.id)
        return gone

    def list(self, kind: str | None = None, model: str | None = None) -> list[ArtifactInfo]:
        found = []
        for sidecar in sorted(self.root.glob("*.json")):
            try:
                info = ArtifactInfo(**json.loads(sidecar.read_text()))
            except (OSError, ValueError, TypeError):
                continue
            if (kind is None or info.kind == kind) and (model is None or info.model == model):
                found.append(info)
        return sorted(found, key=lambda i: i.created)
