"""What the SDK's calls return: plain dataclasses of numpy arrays, PNG bytes and artifact ids."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .tensors import decode_tensor

__all__ = ["ArtifactInfo", "SampleResult", "GradientResult", "OptimizeResult", "IterationRecord",
           "ValidationRecord", "JobInfo", "MemoryPlan", "ServerMetadata", "save_pngs"]


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
        return cls(list(m.images), decode_tensor(m.x0), decode_tensor(m.start_latents),
                   _array(m.pixels, m.HasField("pixels")))

    def save(self, directory, prefix: str = "sample_") -> list[Path]:
        return save_pngs(self.images, directory, prefix)


@dataclass
class MemoryPlan:
    """How the server planned a gradient pass's memory (a ``plan`` event: the first of a call,
    then each that differs). ``network_checkpointing``: ``auto`` also checkpoints inside the
    network, because one step's graph (``graph_bytes``) did not fit ``budget_bytes``."""

    grad_mode: str
    steps: int
    gradient_steps: int
    kept_graphs: int
    stored_states: int
    network_checkpointing: bool
    graph_bytes: int
    budget_bytes: int
    iteration: int = 0
    decoder_slice_size: int = 0        # samples per VAE decoder pass in the backward (0: all at once)
    decoder_checkpointing: str = ""    # "none", "blocks" or "fine": recomputed inside the decoder ("": no decoder)
    decoder_graph_bytes: int = 0       # one sample's decoder graph as planned (0: none planned)
    decoder_tile: int = 0              # > 0: tiled decoding asked (approximate), latent pixels a side

    @classmethod
    def from_message(cls, m) -> "MemoryPlan":
        return cls(m.grad_mode, m.steps, m.gradient_steps, m.kept_graphs, m.stored_states,
                   m.network_checkpointing, m.graph_bytes, m.budget_bytes, m.iteration,
                   m.decoder_slice_size, m.decoder_checkpointing, m.decoder_graph_bytes, m.decoder_tile)


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
    sample_losses: list[float] = field(default_factory=list)
    plans: list[MemoryPlan] = field(default_factory=list)  # the memory plan (its ``plan`` events)

    @classmethod
    def from_message(cls, m, call=None) -> "GradientResult":
        return cls(m.loss, list(m.loss_terms), decode_tensor(m.x0), list(m.images),
                   {k: decode_tensor(v) for k, v in m.gradients.items()},
                   {k: decode_tensor(v) for k, v in m.weight_gradients.items()},
                   ArtifactInfo.from_message(m.weights_artifact), m.nfe, list(m.sample_losses),
                   list(getattr(call, "plans", ())))


@dataclass
class IterationRecord:
    """One optimizer iteration as the server reported it (``x_T``: the iterate it evaluated,
    OptimizeLatent only), so any iterate seen mid-run can be reproduced with ``sample(x_T=…)``."""

    iteration: int
    loss: float
    loss_terms: list[float]
    grad_norm: float
    sample_losses: list[float]
    lr: float
    stopped: list[bool] = field(default_factory=list)
    x_T: np.ndarray | None = None
    images: list[bytes] = field(default_factory=list)

    @classmethod
    def from_message(cls, m) -> "IterationRecord":
        return cls(m.iteration, m.loss, list(m.loss_terms), m.grad_norm, list(m.sample_losses), m.lr,
                   list(m.stopped), _array(m.start_latents, m.HasField("start_latents")), list(m.images))


@dataclass
class ValidationRecord:
    """A fine-tune's adapter on the held-out examples after ``iteration`` steps."""

    iteration: int
    loss: float
    loss_terms: list[float]
    agreement: float | None
    best: bool
    images: list[bytes] = field(default_factory=list)

    @classmethod
    def from_message(cls, m) -> "ValidationRecord":
        return cls(m.iteration, m.loss, list(m.loss_terms),
                   m.agreement if m.HasField("agreement") else None, m.best, list(m.images))


@dataclass
class JobInfo:
    """A fine-tune's ``job`` event, sent first once it is admitted: ``id`` resumes it
    (``resume_job=``) when its stream is lost; ``replica`` runs it now; ``iteration``: where it
    starts (a resumed job: its checkpoint's iteration)."""

    id: str
    replica: str = ""
    iteration: int = 0

    @classmethod
    def from_message(cls, m) -> "JobInfo":
        return cls(m.id, m.replica, m.iteration)


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
    sample_losses: list[float] = field(default_factory=list)   # OptimizeLatent: at x_T, per sample
    best_iteration: list[int] = field(default_factory=list)    # the iterate returned (per sample)
    stopped: list[bool] = field(default_factory=list)          # per sample: stop_when met
    iterations_run: int = 0
    last_x_T: np.ndarray | None = None                         # OptimizeLatent: the final iterate
    iterations: list[IterationRecord] = field(default_factory=list)
    validations: list[ValidationRecord] = field(default_factory=list)
    plans: list[MemoryPlan] = field(default_factory=list)  # memory plans, as they changed

    @classmethod
    def from_message(cls, m, call=None) -> "OptimizeResult":
        return cls(m.loss, list(m.history), decode_tensor(m.start_latents), decode_tensor(m.x0),
                   list(m.images),
                   list(m.initial_images), ArtifactInfo.from_message(m.artifact),
                   list(getattr(call, "checkpoints", ())), list(m.sample_losses),
                   list(m.best_iteration), list(m.stopped), m.iterations_run,
                   _array(m.last_start_latents, m.HasField("last_start_latents")),
                   list(getattr(call, "iterations", ())), list(getattr(call, "validations", ())),
                   list(getattr(call, "plans", ())))


@dataclass
class ServerMetadata:
    """What a server is and can do (``GetServerMetadata``): its release ``version``, the proto
    package it serves (``api_package``), its models, server-side losses, gradient modes, solvers,
    the dtypes a request's tensors may use, the dtype it computes in, the ``limits`` a request
    must respect (``max_steps``, ``max_batch``, ``max_tensor_elements``, …) and the optional
    ``extensions`` its operator turned on."""

    name: str
    version: str
    api_package: str
    models: list[str]
    default_model: str
    losses: list[str]
    grad_modes: list[str]
    solvers: list[str]
    tensor_dtypes: list[str]
    compute_dtype: str
    limits: dict[str, float]
    extensions: list[str] = field(default_factory=list)
    api_packages: list[str] = field(default_factory=list)  # every package it serves

    @classmethod
    def from_message(cls, m) -> "ServerMetadata":
        limits = {f.name: getattr(m.limits, f.name) for f in m.limits.DESCRIPTOR.fields}
        return cls(m.name, m.version, m.api_package, list(m.models), m.default_model, list(m.losses),
                   list(m.grad_modes), list(m.solvers), list(m.tensor_dtypes), m.compute_dtype, limits,
                   list(m.extensions), list(m.api_packages) or [m.api_package])
