"""The server's release: the installed ``adjointdpm-server`` distribution's version; from sources
not installed, the SDK's ``adjointdpm/_version.py`` (the one version of both, which the server's
distribution pins), read without importing the SDK (that would pull in grpc outside the wire)."""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import runpy
from pathlib import Path

__all__ = ["server_version"]


@functools.lru_cache(maxsize=1)
def server_version() -> str:
    try:
        return importlib.metadata.version("adjointdpm-server")
    except importlib.metadata.PackageNotFoundError:
        spec = importlib.util.find_spec("adjointdpm")  # finds the package, runs none of it
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("neither adjointdpm-server nor the adjointdpm SDK is installed") from None
        sdk = Path(next(iter(spec.submodule_search_locations)))
        return runpy.run_path(str(sdk / "_version.py"))["__version__"]
