"""Tasks: what each RPC does, in terms of the core and a model backend (no gRPC here).

Each ``run_*`` takes a ``TaskContext`` (models, engine, artifacts, limits: the server's
``Runtime`` is one), plain specs and a ``Job`` (events, client losses, cancellation) and returns
a result dataclass; the service translates both ways.
"""

from ._context import TaskContext
from ._job import Checkpoint, ClientQuery, IterationReport, Job, LocalJob, Queued, ValidationReport
from ._specs import (ExampleSpec, GenerationSpec, GuidedSpec, LossSpec, OptimizerSpec, StopSpec,
                     TokenSpec, WeightsSpec)
from .embedding import run_optimize_embedding
from .finetune import run_finetune
from .gradient import TARGETS, GradientResult, run_gradient
from .optimize_latent import OptimizeResult, run_optimize_latent
from .sample import SampleResult, run_sample

__all__ = [
    "TaskContext", "Job", "LocalJob", "ClientQuery", "IterationReport", "ValidationReport",
    "Checkpoint", "Queued", "StopSpec",
    "GenerationSpec", "LossSpec", "OptimizerSpec", "TokenSpec", "WeightsSpec", "GuidedSpec",
    "ExampleSpec", "TARGETS",
    "run_sample", "run_gradient", "run_optimize_latent", "run_finetune", "run_optimize_embedding",
    "SampleResult", "GradientResult", "OptimizeResult",
]
