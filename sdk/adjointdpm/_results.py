"""What the SDK's calls return: plain dataclasses of numpy arrays, PNG bytes and artifact ids."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._tensors import decode_tensor

__all__ = ["ArtifactInfo", "SampleResult", "GradientResult", "OptimizeResult", "save_pngs"]


def save_pngs(images: list[bytes], directory, prefix: str) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, data in enumerate(images):
        path = directory / f"{prefix}{k:03d}.png"
        path.write_bytes(data)
        paths.append(path)
    return paths


def _array(msg, present: bool):
    return decode_tensor(msg) if present else None


@dataclass
class ArtifactInfo:
    id: str
    kind: str
    model: str
    size: int = 0
    name: str = ""
    iteration: int = 0
    metadata: dict = field(default_factory=dict)

    @classmethod
    def from_message(cls, msg) -> "ArtifactInfo | None":
        if not msg.id:
            return None
        from google.protobuf.json_format import MessageToDict

        return cls(msg.id, msg.kind, msg.model, msg.size, msg.name, msg.iteration,
                   MessageToDict(msg.metadata) if msg.HasField("metadata") else {})


@dataclass
class SampleResult:
    images: list[bytes]
    x0: np.ndarray
    x_T: np.ndarray
    pixels: np.ndarray | None = None

    @classmethod
    def from_message(cls, m) -> "SampleResult":
        return cls(list(m.images), decode_tensor(m.x0), decode_tensor(m.x_T),
                   _array(m.pixels, m.HasField("pixels")))

    def save(self, directory, prefix: str = "sample_") -> list[Path]:
        return save_pngs(self.images, directory, prefix)


@dataclass
class GradientResult:
    loss: float
    loss_terms: list[float]
    x0: np.ndarray
    images: list[bytes]
    gradients: dict[str, np.ndarray]
    weight_gradients: dict[str, np.ndarray]
    weights_artifact: ArtifactInfo | None
    nfe: int

    @classmethod
    def from_message(cls, m) -> "GradientResult":
        return cls(m.loss, list(m.loss_terms), decode_tensor(m.x0), list(m.images),
                   {k: decode_tensor(v) for k, v in m.gradients.items()},
                   {k: decode_tensor(v) for k, v in m.weight_gradients.items()},
                   ArtifactInfo.from_message(m.weights_artifact), m.nfe)


@dataclass
class OptimizeResult:
    loss: float
    history: list[float]
    x_T: np.ndarray
    x0: np.ndarray
    images: list[bytes]
    initial_images: list[bytes]
    artifact: ArtifactInfo | None
    checkpoints: list[ArtifactInfo] = field(default_factory=list)

    @classmethod
    def from_message(cls, m, checkpoints=()) -> "OptimizeResult":
        return cls(m.loss, list(m.history), decode_tensor(m.x_T), decode_tensor(m.x0), list(m.images),
                   list(m.initial_images), ArtifactInfo.from_message(m.artifact), list(checkpoints))
