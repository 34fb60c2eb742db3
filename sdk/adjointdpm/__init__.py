"""AdjointDPM SDK: a light client for the AdjointDPM gRPC service (imports neither torch nor the server)."""

__version__ = "0.1.0"
__all__ = ["__version__"]
