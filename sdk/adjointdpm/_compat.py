"""Which servers this SDK speaks to: those that serve its proto package (semantic versioning:
within a major version, releases only add to the wire contract; docs/design.md §4.9).

``GetServerMetadata`` is read once per channel, before its first call. A server of the same major
version serves this package by construction; one of another major version is refused unless it
lists this package among those it serves (a 2.x server keeping adjointdpm.v1 beside v2); one too
old to answer is refused. Each refusal says what to install."""

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
    served = meta.api_packages or [meta.api_package]
    if API_PACKAGE in served and (theirs == ours or len(served) > 1):
        return None
    wanted = (f"pip install 'adjointdpm>={theirs},<{theirs + 1}'" if theirs is not None
              else "an SDK of the server's release")
    return (f"the server at {target} runs {meta.name or 'adjointdpm-server'} {meta.version or '?'} "
            f"(API {', '.join(p for p in served if p) or '?'}); this SDK is adjointdpm {__version__} (API "
            f"{API_PACKAGE}) and speaks only to servers of major version {ours}: {wanted}, or "
            f"point it at a server of release {ours}.x")


TOO_OLD = ("the server at {target} does not answer GetServerMetadata on {service}: it predates "
           "adjointdpm 1.0 (whose API is adjointdpm.v1.AdjointDPMService); upgrade the server, or use "
           "the SDK of its release")
