"""What replicas of the service share: storage holds, tenants' job slots and the fine-tune job
registry with leases (``Coordination``), in this process (``LocalCoordination``, the default) or
in Redis (``RedisCoordination``, for N replicas); ``coordination(url, …)`` picks by address."""

from __future__ import annotations

import os
import socket
import uuid

from ._base import JOB_STATES, Coordination, JobRecord
from ._local import LocalCoordination

__all__ = ["Coordination", "JobRecord", "JOB_STATES", "LocalCoordination", "coordination",
           "default_replica"]


def default_replica() -> str:
    """This process's name in the cluster: the pod's (POD_NAME) or host's, and a nonce that
    tells two lives of one pod apart."""
    base = os.environ.get("POD_NAME") or socket.gethostname() or "replica"
    return f"{base}-{uuid.uuid4().hex[:6]}"


def coordination(url: str | None, replica: str, lease_s: float = 30.0) -> Coordination:
    """``local`` (or empty): this process; ``redis://…`` / ``rediss://…`` / ``unix://…``: Redis."""
    if not url or url == "local":
        return LocalCoordination(replica, lease_s)
    scheme = url.partition("://")[0]
    if scheme in ("redis", "rediss", "unix"):
        from ._redis import RedisCoordination

        return RedisCoordination(url, replica, lease_s)
    raise ValueError(f"unknown coordination store {url!r}: use 'local' or redis://host:port/db")
