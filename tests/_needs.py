"""What a test needs that tests/requirements.txt or scripts install: missing on a developer's machine,
the test is skipped with the reason; in CI (``.ci/run`` sets ADJOINTDPM_REQUIRE_TOOLS=1, and
installs all of it) a missing piece fails the test instead of hiding it as a skip."""

from __future__ import annotations

import importlib
import os

import pytest

REQUIRED = os.environ.get("ADJOINTDPM_REQUIRE_TOOLS") == "1"


def missing(what: str):
    """Stop the test: ``what`` is not here (a failure in CI, a skip elsewhere)."""
    if REQUIRED:
        pytest.fail(f"CI installs this and it is missing: {what}", pytrace=False)
    pytest.skip(f"not installed: {what}")


def needs_module(name: str, what: str):
    """``name`` imported, or ``missing(what)``."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(what)
