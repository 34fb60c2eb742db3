"""The one way an interceptor wraps a gRPC method handler (auth, the call limit and telemetry
all do): the same kind of handler — unary or streaming on either side — whose behaviour runs
inside ``around(request, context)``, a context manager that may refuse the call (abort in its
enter), account for it (its exit runs when a streaming response ends, however it ends) and hand
the behaviour a checked request (what it yields)."""

from __future__ import annotations

from typing import Callable, ContextManager

import grpc

__all__ = ["wrap"]

_MAKERS = {(False, False): grpc.unary_unary_rpc_method_handler,
           (False, True): grpc.unary_stream_rpc_method_handler,
           (True, False): grpc.stream_unary_rpc_method_handler,
           (True, True): grpc.stream_stream_rpc_method_handler}


def wrap(handler, around: Callable[..., ContextManager], *, request_deserializer=None):
    """``handler`` (None stays None) with its behaviour inside ``around``; ``request_deserializer``
    replaces the handler's own when given."""
    if handler is None:
        return None
    kind = (handler.request_streaming, handler.response_streaming)
    inner = {(False, False): handler.unary_unary, (False, True): handler.unary_stream,
             (True, False): handler.stream_unary, (True, True): handler.stream_stream}[kind]

    if handler.response_streaming:
        def behaviour(request, context):
            with around(request, context) as checked:
                yield from inner(checked, context)
    else:
        def behaviour(request, context):
            with around(request, context) as checked:
                return inner(checked, context)

    return _MAKERS[kind](behaviour, request_deserializer or handler.request_deserializer,
                         handler.response_serializer)
