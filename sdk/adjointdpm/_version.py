"""The one version of both distributions: ``adjointdpm`` (sdk/pyproject.toml reads it) and
``adjointdpm-server`` (server/setup.py reads it and pins ``adjointdpm==`` to it)."""

__version__ = "1.0.0"
