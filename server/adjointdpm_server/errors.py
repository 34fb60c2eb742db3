"""Errors a request can end with, each naming its gRPC status code by name.

Tasks and losses raise these (no gRPC import below the service layer); the service maps
``code`` to ``grpc.StatusCode[code]`` and sends ``str(error)`` as the message a user acts on.
"""

from __future__ import annotations

__all__ = ["ServiceError", "InvalidArgument", "NotFound", "FailedPrecondition",
           "ResourceExhausted", "Cancelled", "Unavailable", "DeadlineExceeded", "DataLoss"]


class ServiceError(Exception):
    """``retry_after_s``: when a retry may succeed (sent as ``grpc-retry-pushback-ms``)."""

    code = "INTERNAL"

    def __init__(self, *args, retry_after_s: float | None = None):
        super().__init__(*args)
        self.retry_after_s = retry_after_s


class InvalidArgument(ServiceError, ValueError):
    code = "INVALID_ARGUMENT"


class NotFound(ServiceError, LookupError):
    code = "NOT_FOUND"


class FailedPrecondition(ServiceError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(ServiceError):
    code = "RESOURCE_EXHAUSTED"


class Cancelled(ServiceError):
    code = "CANCELLED"


class Unavailable(ServiceError):
    code = "UNAVAILABLE"


class DeadlineExceeded(ServiceError):
    code = "DEADLINE_EXCEEDED"


class DataLoss(ServiceError):
    """Stored bytes that no longer match the checksum recorded when they were written."""

    code = "DATA_LOSS"
