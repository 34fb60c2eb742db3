#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the whole suite (slow extras excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" -m "not slow" "$@"
