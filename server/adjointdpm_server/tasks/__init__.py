"""Tasks: what each RPC does, in terms of the core and a model backend (no gRPC here).

Each ``run_*`` (named after its RPC) takes a ``TaskContext`` (models, engine, artifacts, limits:
the server's ``Runtime`` is one), plain specs of its inputs, a ``Job`` (events, client losses,
cancellation) and the request's options object (``adjointdpm.options.values``: attributes by SDK
keyword), and returns a result dataclass; the wire translates both ways.
"""

from ._context import TaskContext
from ._job import (Checkpoint, ClientQuery, IterationReport, Job, JobStarted, LocalJob, PlanReport,
                   Queued, ValidationReport)
from ._specs import ConditionSpec, ExampleSpec, GenerationSpec, LossSpec, TokenSpec
from .optimize_embedding import run_optimize_embedding
from .finetune_weights import run_finetune_weights
from .compute_gradient import TARGETS, GradientResult, run_compute_gradient
from .optimize_latent import OptimizeResult, run_optimize_latent
from .sample import SampleResult, run_sample

__all__ = [
    "TaskContext", "Job", "LocalJob", "ClientQuery", "IterationReport", "ValidationReport",
    "Checkpoint", "JobStarted", "Queued", "PlanReport", "GenerationSpec", "LossSpec", "TokenSpec", "ExampleSpec",
    "ConditionSpec", "TARGETS",
    "run_sample", "run_compute_gradient", "run_optimize_latent", "run_finetune_weights",
    "run_optimize_embedding",
    "SampleResult", "GradientResult", "OptimizeResult",
]
