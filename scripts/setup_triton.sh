#!/usr/bin/env bash
# Creates .venv-triton (once): PyTriton with its bundled Triton Inference Server (runs on CPU),
# for the Triton loss tests (tests/triton_peer/serve_mse_loss.py). Kept apart from .venv because
# PyTriton needs numpy<2. Idempotent: re-installs only when tests/triton_peer/requirements.txt or
# the interpreter changed. Triton's Python backend stub loads libpython3.11.so.1.0, which must be
# this interpreter's own (serve_mse_loss.py puts its LIBDIR first on LD_LIBRARY_PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${TRITON_PYTHON:-python3.11}
VENV=.venv-triton
req=tests/triton_peer/requirements.txt
# One installer at a time: pytest-xdist workers may each call this.
exec 9<scripts/setup_triton.sh; flock 9
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.adjointdpm-installed"
want=$( { cat "$req"; "$VENV/bin/python" -VV; } | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q -r "$req"
  "$VENV/bin/python" -c "import pytriton.triton"
  echo "$want" > "$stamp"
fi
