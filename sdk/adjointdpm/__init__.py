"""AdjointDPM SDK: a light client for the AdjointDPM gRPC service.

    import adjointdpm
    client = adjointdpm.Client("localhost:50051")
    grid = client.sample(labels=range(10), seed=0)

    @adjointdpm.loss("darker")
    def darker(image):                     # a torch tensor when torch is installed …
        return image.mean()
    result = client.compute_gradient("darker", labels=3, seed=0)
    result.gradients["x_T"]                # numpy

Imports neither torch nor the server; torch is used only if installed, for client-side losses.
"""

from . import aio
from ._client import AdjointDPMError, Call, Client, IncompatibleServer, JobInterrupted
from ._losses import ClientLoss, ServerLoss, loss, registered_losses
from ._results import (ArtifactInfo, GradientResult, IterationRecord, JobInfo, MemoryPlan,
                       OptimizeResult, SampleResult, ServerMetadata, ValidationRecord)
from .tensors import TensorError, decode_tensor, encode_tensor
from ._version import __version__

__all__ = [
    "Client", "Call", "AdjointDPMError", "JobInterrupted", "IncompatibleServer", "ServerMetadata", "aio",
    "loss", "registered_losses", "ClientLoss", "ServerLoss",
    "SampleResult", "GradientResult", "OptimizeResult", "ArtifactInfo", "IterationRecord",
    "ValidationRecord", "JobInfo", "MemoryPlan",
    "encode_tensor", "decode_tensor", "TensorError",
    "__version__",
]
