#!/usr/bin/env bash
# Wheels for running the server and benchmarks/gpu.py on a CUDA machine whose Python already has
# torch (and numpy, transformers, peft, safetensors, torchdiffeq, prometheus-client, Pillow, tqdm)
# but no network: the pure-Python server dependencies it lacks plus grpcio/protobuf at the versions
# the generated code needs, pinned by constraints.txt, downloaded here into .whl/ (git-ignored).
#
#   bash scripts/gpu_wheels.sh [PYTHON_VERSION]        # default 3.12
#   # there, from the repository root:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:server:sdk python3 benchmarks/gpu.py --service --minutes 8
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-3.12}"
pins() { for name in "$@"; do grep -iE "^${name//-/[-_]}==" constraints.txt || { echo "no pin for $name" >&2; exit 1; }; done; }
wanted=$(pins diffusers grpcio grpcio-health-checking grpcio-reflection protobuf opentelemetry-api \
              importlib-metadata tritonclient)
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl \
  --python-version "$py" --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  $wanted
ls -l .whl
