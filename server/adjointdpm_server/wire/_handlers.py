"""The one way an interceptor wraps a gRPC method handler (auth, the call limit and telemetry
all do): the same kind of handler — unary or streaming on either side — whose behaviour runs
inside ``around(request, context)``, a context manager that may refuse the call (abort in its
enter), account for it (its exit runs when a streaming response ends, however it ends) and hand
the behaviour a checked request (what it yields); ``before_response(context)``, when given, runs
once just before the first response message leaves (so a call refused before it answers nothing
gets a Trailers-Only status, which gRPC clients may retry)."""

from __future__ import annotations

from typing import Callable, ContextManager

import grpc

__all__ = ["wrap"]

_MAKERS = {(False, False): grpc.unary_unary_rpc_method_handler,
           (False, True): grpc.unary_stream_rpc_method_handler,
           (True, False): grpc.stream_unary_rpc_method_handler,
           (True, True): grpc.stream_stream_rpc_method_handler}


def wrap(handler, around: Callable[..., ContextManager], *, request_deserializer=None,
         before_response: Callable | None = None):
    """``handler`` (None stays None) with its behaviour inside ``around``; ``request_deserializer``
    replaces the handler's own when given; ``before_response(context)`` runs before the first
    response message (unary: once the behaviour returned)."""
    if handler is None:
        return None
    kind = (handler.request_streaming, handler.response_streaming)
    inner = {(False, False): handler.unary_unary, (False, True): handler.unary_stream,
             (True, False): handler.stream_unary, (True, True): handler.stream_stream}[kind]

    if handler.response_streaming and before_response is None:
        def behaviour(request, context):
            with around(request, context) as checked:
                yield from inner(checked, context)
    elif handler.response_streaming:
        def behaviour(request, context):
            with around(request, context) as checked:
                responses = iter(inner(checked, context))
                try:
                    for response in responses:
                        before_response(context)
                        yield response
                        break
                    yield from responses
                finally:  # as ``yield from`` would: a stream closed early closes the handler's too
                    close = getattr(responses, "close", None)
                    if close is not None:
                        close()
    else:
        def behaviour(request, context):
            with around(request, context) as checked:
                response = inner(checked, context)
                if before_response is not None:
                    before_response(context)
                return response

    return _MAKERS[kind](behaviour, request_deserializer or handler.request_deserializer,
                         handler.response_serializer)
