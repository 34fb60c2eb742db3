#!/usr/bin/env bash
# Creates .venv (once) and installs both distributions from this checkout, editable — the SDK
# (sdk/, `adjointdpm`) and the server (server/, `adjointdpm-server`) — and what the tests need
# (tests/requirements.txt), all with the pinned set in constraints.txt.
# Idempotent: re-runs only when a file it installs from changed (ADJOINTDPM_VENV: another venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${ADJOINTDPM_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.adjointdpm-installed"
inputs=(sdk/pyproject.toml sdk/adjointdpm/_version.py server/pyproject.toml server/setup.py
        tests/requirements.txt constraints.txt)
want=$(sha256sum "${inputs[@]}" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # Left in the root by the single pyproject.toml of before the split (git-ignored): from the
  # root, on sys.path, its metadata (adjointdpm 0.1.0) would shadow the SDK's.
  rm -rf adjointdpm.egg-info
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first: the local CPU build; a plain `torch` would pull a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e ./sdk -e ./server -r tests/requirements.txt
  echo "$want" > "$stamp"
fi
