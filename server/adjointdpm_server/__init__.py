"""AdjointDPM server: gradients through diffusion sampling, served over gRPC."""


def __getattr__(name: str):
    # ``__version__``: computed on first use (version.py: the installed distribution's, else the
    # SDK's one version file), so importing the package stays free of metadata lookups.
    if name == "__version__":
        from .version import server_version

        return server_version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
