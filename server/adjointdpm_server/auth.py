"""Bearer-token authentication as one server interceptor (grpc's auth example), and TLS/mTLS
server credentials from PEM files.

Tokens come from a file (one per line, ``#`` comments) and/or ``ADJOINTDPM_TOKENS`` (comma
separated); each presented token is compared with every configured one in constant time.
Health checking may stay open so that kubelet probes need no secret.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import Iterable

import grpc

__all__ = ["load_tokens", "TokenAuthInterceptor", "server_credentials", "caller_of"]

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


def caller_of(context) -> str:
    """Who a call is from, for fair sharing: a digest of its bearer token (never the token), or
    the peer's address without the port when there is none."""
    metadata = dict(context.invocation_metadata() or ())
    scheme, _, token = metadata.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return "token:" + hashlib.sha256(token.strip().encode()).hexdigest()[:16]
    peer = context.peer() or "unknown"
    host = peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer
    return "peer:" + host


def _deny(handler, code: grpc.StatusCode, details: str):
    """A handler of the same kind as ``handler`` that only aborts."""
    def abort(request, context):
        context.abort(code, details)

    if handler is None:
        return None
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, tokens: Iterable[str], *, health_open: bool = True):
        self._digests = [hashlib.sha256(t.encode()).digest() for t in tokens]
        if not self._digests:
            raise ValueError("token authentication needs at least one token")
        self._health_open = health_open

    def _valid(self, presented: str) -> bool:
        # digests of equal length: the comparison's time reveals neither which token nor its length
        candidate = hashlib.sha256(presented.encode()).digest()
        ok = False
        for token in self._digests:  # no early exit
            ok |= hmac.compare_digest(candidate, token)
        return ok

    def intercept_service(self, continuation, handler_call_details):
        if self._health_open and handler_call_details.method == HEALTH_CHECK:
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        header = metadata.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token and self._valid(token.strip()):
            return continuation(handler_call_details)
        reason = "missing bearer token" if not header else "invalid bearer token"
        return _deny(continuation(handler_call_details), grpc.StatusCode.UNAUTHENTICATED,
                     f"{reason}: send 'authorization: Bearer <token>'")


def server_credentials(cert: str | Path, key: str | Path, client_ca: str | Path | None = None):
    """TLS from PEM files; with ``client_ca``, mutual TLS (clients must present a certificate)."""
    root = Path(client_ca).read_bytes() if client_ca else None
    return grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())],
                                       root_certificates=root, require_client_auth=root is not None)
