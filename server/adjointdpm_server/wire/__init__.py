"""The gRPC edge: the only part of the server that imports grpc and the generated
``adjointdpm.v1`` modules. It authenticates and limits calls (interceptors), turns request
messages into task specs and results into messages (``convert``, through ``adjointdpm.options``),
runs each task as a ``StreamJob`` and maps every error to its status (``servicer``).
"""

from .server import build_server

__all__ = ["build_server"]
