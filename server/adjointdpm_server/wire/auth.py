"""Bearer-token authentication as one server interceptor (grpc's auth example), tenants, and
TLS/mTLS server credentials from PEM files.

Tokens come from a file (one per line, ``#`` comments) and/or ``ADJOINTDPM_TOKENS`` (comma
separated), each ``TENANT:TOKEN`` or a bare ``TOKEN`` (tenant ``default``); a presented token is
compared with every configured one in constant time. Health checking may stay open so that
kubelet probes need no secret.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import grpc

from ..config import TENANT_CALLER
from ._handlers import wrap

__all__ = ["load_tokens", "Tenants", "TokenAuthInterceptor", "server_credentials", "caller_of",
           "DEFAULT_TENANT"]

DEFAULT_TENANT = "default"
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

HEALTH_CHECK = "/grpc.health.v1.Health/Check"  # open; Watch (a long stream) needs a token


def load_tokens(path: str | Path | None = None, env: str = "ADJOINTDPM_TOKENS") -> tuple[str, ...]:
    tokens = []
    if path:
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                tokens.append(line)
    tokens += [t.strip() for t in os.environ.get(env, "").split(",") if t.strip()]
    return tuple(dict.fromkeys(tokens))


def _bearer(metadata) -> str:
    scheme, _, token = dict(metadata or ()).get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class Tenants:
    """Token → tenant, by SHA-256 digests compared in constant time over every entry."""

    def __init__(self, entries: Iterable[str]):
        self._table: list[tuple[bytes, str]] = []
        for entry in entries:
            name, sep, token = entry.partition(":")
            if not (sep and token and _TENANT.fullmatch(name)):
                name, token = DEFAULT_TENANT, entry
            self._table.append((hashlib.sha256(token.encode()).digest(), name))
        if not self._table:
            raise ValueError("token authentication needs at least one token")

    @property
    def names(self) -> list[str]:
        return sorted({name for _, name in self._table})

    def tenant_of(self, presented: str) -> str | None:
        """The tenant of a presented token, or None; the time taken reveals neither which token
        matched nor any length (digests of equal length, no early exit)."""
        candidate = hashlib.sha256(presented.encode()).digest()
        found = None
        for digest, name in self._table:
            if hmac.compare_digest(candidate, digest):
                found = name
        return found

    def of_metadata(self, metadata) -> str | None:
        token = _bearer(metadata)
        return self.tenant_of(token) if token else None


def caller_of(context, tenant: str | None = None) -> str:
    """Who a call is from, for fair sharing: its tenant when tokens are configured, else the
    peer's address without the port."""
    if tenant is not None:
        return TENANT_CALLER + tenant
    peer = context.peer() or "unknown"
    host = peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer
    return "peer:" + host


def _denied(code: grpc.StatusCode, details: str):
    """A call's behaviour replaced by a refusal (``wrap`` keeps the handler's kind)."""
    @contextmanager
    def refuse(request, context):
        context.abort(code, details)
        yield request  # never reached: abort raises
    return refuse


class TokenAuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, tenants: Tenants | Iterable[str], *, health_open: bool = True):
        self.tenants = tenants if isinstance(tenants, Tenants) else Tenants(tenants)
        self._health_open = health_open

    def intercept_service(self, continuation, handler_call_details):
        if self._health_open and handler_call_details.method == HEALTH_CHECK:
            return continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata
        if self.tenants.of_metadata(metadata) is not None:
            return continuation(handler_call_details)
        header = dict(metadata or ()).get("authorization", "")
        reason = "missing bearer token" if not header else "invalid bearer token"
        return wrap(continuation(handler_call_details),
                    _denied(grpc.StatusCode.UNAUTHENTICATED, f"{reason}: send 'authorization: Bearer <token>'"))


def server_credentials(cert: str | Path, key: str | Path, client_ca: str | Path | None = None):
    """TLS from PEM files; with ``client_ca``, mutual TLS (clients must present a certificate)."""
    root = Path(client_ca).read_bytes() if client_ca else None
    return grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())],
                                       root_certificates=root, require_client_auth=root is not None)
