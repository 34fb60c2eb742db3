"""AdjointDPM server: gradients through diffusion sampling, served over gRPC."""

__version__ = "0.1.0"
