"""Which servers this SDK speaks to: the same major version and proto package (semantic
versioning: within a major version, releases only add to the wire contract; docs/design.md §4.9).

``GetServerMetadata`` is read once per channel, before its first call; a server of another major
version, or one too old to answer it, is refused with a message that says what to install."""

from __future__ import annotations

from ._version import __version__
from .v1 import adjointdpm_pb2 as pb

__all__ = ["API_PACKAGE", "major", "incompatibility", "TOO_OLD", "__version__"]

API_PACKAGE = pb.DESCRIPTOR.package  # "adjointdpm.v1"


def major(version: str) -> int | None:
    """The major number of a semantic version ("1.4.2" → 1); None when it is not one."""
    head = version.strip().lstrip("v").split(".", 1)[0]
    return int(head) if head.isdigit() else None


def incompatibility(meta, target: str) -> str | None:
    """Why this SDK must not talk to the server that sent ``meta`` (a ServerMetadata), or None."""
    theirs, ours = major(meta.version), major(__version__)
    if theirs == ours and meta.api_package == API_PACKAGE:
        return None
    wanted = (f"pip install 'adjointdpm>={theirs},<{theirs + 1}'" if theirs is not None
              else "an SDK of the server's release")
    return (f"the server at {target} runs {meta.name or 'adjointdpm-server'} {meta.version or '?'} "
            f"(API {meta.api_package or '?'}); this SDK is adjointdpm {__version__} (API "
            f"{API_PACKAGE}) and speaks only to servers of major version {ours}: {wanted}, or "
            f"point it at a server of release {ours}.x")


TOO_OLD = ("the server at {target} does not answer GetServerMetadata on {service}: it predates "
           "adjointdpm 1.0 (whose API is adjointdpm.v1.AdjointDPMService); upgrade the server, or use "
           "the SDK of its release")
