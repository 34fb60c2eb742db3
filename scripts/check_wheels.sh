#!/usr/bin/env bash
# The two distributions as a user gets them (CI, after scripts/test.sh). Builds the sdists and the
# wheels of `adjointdpm` (sdk/) and `adjointdpm-server` (server/) with the project venv's build and
# setuptools (--no-isolation: nothing is fetched to build), each wheel from its sdist — the
# server's then finds its version in its PKG-INFO, not in ../sdk — and `twine check`s all four.
# Then, each in a fresh venv:
#   the SDK wheel alone: no torch, no adjointdpm_server, typed (py.typed, the .pyi stubs), and
#     `adjointdpm --version` says the version of sdk/adjointdpm/_version.py;
#   the server: torch==2.13.0 first, then both wheels; `adjointdpm-server` serves the embedded
#     digits model and the SDK venv's `adjointdpm` CLI samples and takes a gradient from it.
# ADJOINTDPM_VENV: the project venv whose python builds (default .venv); PYTHON makes the venvs.
# Exits non-zero on any failure; removes what it made and stops the server on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${ADJOINTDPM_VENV:-.venv}
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
BUILD_PY="$VENV/bin/python"
PY=${PYTHON:-python3}
[ -x "$BUILD_PY" ] || { echo "check_wheels: no $BUILD_PY (run scripts/setup.sh first)" >&2; exit 1; }

fail() { echo "check_wheels: $*" >&2; exit 1; }
now() { date +%s.%N; }
work=$(mktemp -d "${TMPDIR:-/tmp}/adjointdpm-wheels.XXXXXX")
server_pid=""
stop_server() {  # SIGTERM (a graceful drain), SIGKILL after 60 s; returns the server's exit status
  local pid=$server_pid rc=0
  server_pid=""
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "check_wheels: the server did not stop in 60 s of SIGTERM; killed" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || rc=$?
  return "$rc"
}
cleanup() {
  local status=$?
  if [ -n "$server_pid" ]; then stop_server || true; fi
  local t0; t0=$(now)
  rm -rf "$work"
  awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "check_wheels: %-34s %6.1f s\n", "cleanup", b - a }'
  if [ "$status" -ne 0 ]; then echo "check_wheels: FAILED (exit $status)" >&2; fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start=$(now); phase_start=$start; phase_name=""
phase() {  # phase NAME: closes the previous phase (printing its time) and opens the next
  local t; t=$(now)
  if [ -n "$phase_name" ]; then
    awk -v a="$phase_start" -v b="$t" -v n="$phase_name" 'BEGIN { printf "check_wheels: %-34s %6.1f s\n", n, b - a }'
  fi
  phase_start=$t; phase_name=$1
}

version=$("$BUILD_PY" -c 'import runpy, sys; print(runpy.run_path(sys.argv[1])["__version__"])' \
            sdk/adjointdpm/_version.py)
[ -n "$version" ] || fail "no version in sdk/adjointdpm/_version.py"
echo "check_wheels: version $version (sdk/adjointdpm/_version.py)"

# ---- build: sdist, then the wheel from the sdist, for each -------------------------------------
phase "build sdists and wheels"
# A copy of sdk/ and server/ side by side, without build leftovers, so the checkout stays clean.
mkdir -p "$work/src" "$work/dist"
for d in sdk server; do
  tar -C "$ROOT" -c --exclude=build --exclude=dist --exclude='*.egg-info' --exclude=__pycache__ \
      --exclude='*.pyc' "$d" | tar -C "$work/src" -x
done
for d in sdk server; do
  "$BUILD_PY" -m build --no-isolation --outdir "$work/dist" "$work/src/$d" > "$work/build-$d.log" 2>&1 \
    || { tail -40 "$work/build-$d.log" >&2; fail "building $d failed"; }
done
sdk_sdist="$work/dist/adjointdpm-$version.tar.gz"
sdk_wheel="$work/dist/adjointdpm-$version-py3-none-any.whl"
server_sdist="$work/dist/adjointdpm_server-$version.tar.gz"
server_wheel="$work/dist/adjointdpm_server-$version-py3-none-any.whl"
for f in "$sdk_sdist" "$sdk_wheel" "$server_sdist" "$server_wheel"; do
  [ -f "$f" ] || fail "missing $(basename "$f"); built: $(ls "$work/dist" | tr '\n' ' ')"
done
[ "$(ls "$work/dist" | wc -l)" -eq 4 ] || fail "expected 4 files, built: $(ls "$work/dist" | tr '\n' ' ')"
# The server's wheel was built from its sdist, where no ../sdk lies beside setup.py.
listing=$(tar -tzf "$server_sdist")
grep -qx "adjointdpm_server-$version/PKG-INFO" <<< "$listing" || fail "the server sdist has no PKG-INFO"
grep -qx "adjointdpm_server-$version/setup.py" <<< "$listing" || fail "the server sdist has no setup.py"
if grep -q "/adjointdpm/" <<< "$listing"; then fail "the server sdist holds the SDK"; fi
ls -l "$work/dist"

phase "twine check"
"$BUILD_PY" -m twine --no-color check --strict "$work/dist"/*

# ---- the SDK wheel alone -----------------------------------------------------------------------
phase "SDK venv: install the wheel"
"$PY" -m venv "$work/sdk-venv"
sdk_py="$work/sdk-venv/bin/python"
"$sdk_py" -m pip install -q -c "$ROOT/constraints.txt" "$sdk_wheel"

phase "SDK venv: checks"
(cd "$work" && "$sdk_py" - "$version" <<'EOF'
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

version = sys.argv[1]
assert importlib.util.find_spec("torch") is None, "torch is installed with the SDK alone"
try:
    import adjointdpm_server  # noqa: F401
except ImportError:
    pass
else:
    raise AssertionError("adjointdpm_server imports from an SDK-only install")
import adjointdpm

package = Path(adjointdpm.__file__).parent
assert "site-packages" in package.parts, package
assert adjointdpm.__version__ == version, (adjointdpm.__version__, version)
assert importlib.metadata.version("adjointdpm") == version
files = [str(f) for f in importlib.metadata.files("adjointdpm")]
stray = [f for f in files if f.startswith("adjointdpm_server")]
assert not stray, stray
assert not (package.parent / "adjointdpm_server").exists(), "adjointdpm_server/ in site-packages"
for name in ("py.typed", "v1/adjointdpm_pb2.pyi", "v1/adjointdpm_pb2_grpc.py"):
    assert (package / name).is_file(), f"{name} is not installed"
print(f"SDK alone: adjointdpm {version} from {package}, no torch, no server, typed")
EOF
)
got=$("$work/sdk-venv/bin/adjointdpm" --version)
[ "$got" = "adjointdpm $version" ] || fail "adjointdpm --version said '$got', not 'adjointdpm $version'"
echo "$got"

# ---- the server: torch, then both wheels -------------------------------------------------------
phase "server venv: install torch + wheels"
"$PY" -m venv "$work/server-venv"
server_bin="$work/server-venv/bin"
# torch first: the local CPU build; a plain `torch` would pull a multi-GB CUDA build.
"$server_bin/python" -m pip install -q "torch==2.13.0"
"$server_bin/python" -m pip install -q -c "$ROOT/constraints.txt" "$sdk_wheel" "$server_wheel"
"$server_bin/python" -m pip check
got=$("$server_bin/adjointdpm-server" --version)
[ "$got" = "adjointdpm-server $version" ] || fail "adjointdpm-server --version said '$got'"
echo "$got"

phase "server: start (digits)"
mkdir -p "$work/artifacts" "$work/out"
# --port 0: the server binds a free port and prints it.
(cd "$work" && exec "$server_bin/adjointdpm-server" --port 0 --artifact-dir "$work/artifacts") \
  > "$work/server.log" 2>&1 &
server_pid=$!
port=""
for _ in $(seq 1 600); do
  port=$(sed -n 's/^adjointdpm-server listening on 127\.0\.0\.1:\([0-9][0-9]*\)$/\1/p' "$work/server.log")
  [ -n "$port" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; fail "the server exited while starting"; }
  sleep 0.2
done
[ -n "$port" ] || { tail -40 "$work/server.log" >&2; fail "the server did not start in 120 s"; }
echo "server listening on 127.0.0.1:$port"

phase "SDK CLI: sample + grad"
cli=("$work/sdk-venv/bin/adjointdpm" --target "127.0.0.1:$port")
(cd "$work" && "${cli[@]}" sample --steps 4 --seed 0 --out "$work/out/sample")
ls "$work/out/sample"/*.png > /dev/null 2>&1 || fail "sample wrote no PNG"
ls "$work/out/sample"/*.safetensors > /dev/null 2>&1 || fail "sample wrote no tensors"
(cd "$work" && "${cli[@]}" grad --loss classifier --params '{"label": 8}' --label 3 --steps 4 \
   --seed 0 --out "$work/out/grad")
ls "$work/out/grad"/*.safetensors > /dev/null 2>&1 || fail "grad wrote no gradient file"
"$sdk_py" - "$work/out/grad" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

(path,) = Path(sys.argv[1]).glob("*.safetensors")
tensors = load_file(str(path))
assert tensors["x_T"].shape == (1, 1, 8, 8), {k: v.shape for k, v in tensors.items()}
assert all(v.size and np.isfinite(v).all() for v in tensors.values()), "non-finite gradient"
print(f"gradient file {path.name}: {sorted(tensors)}")
EOF

phase "server: stop"
rc=0; stop_server || rc=$?
[ "$rc" -eq 0 ] || { tail -40 "$work/server.log" >&2; fail "the server exited $rc on SIGTERM"; }

phase ""
awk -v a="$start" -v b="$(now)" 'BEGIN { printf "check_wheels: OK, both distributions, %.1f s in all\n", b - a }'
