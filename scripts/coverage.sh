#!/usr/bin/env bash
# Line coverage of the whole suite, run by hand (not in CI): servers the tests start in
# subprocesses are measured too (coverage's `patch = subprocess`). Installs coverage and
# pytest-cov into .venv on first use; writes the summary to benchmarks/results/coverage.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pip install -q -c constraints.txt "coverage==7.17.3" "pytest-cov==7.1.0"
rm -f .coverage .coverage.*
.venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" -m "not slow" -q -p no:cacheprovider \
    --cov --cov-config=scripts/coverage.toml --cov-report= "$@"
.venv/bin/python -m coverage combine --rcfile=scripts/coverage.toml -q || true
{
  echo "# Line coverage"
  echo
  echo "- command: \`scripts/coverage.sh\` ($(date -u +%Y-%m-%dT%H:%M) UTC; config scripts/coverage.toml)"
  echo "- the README's test command under coverage, subprocess servers included; generated protobuf code omitted"
  echo
  .venv/bin/python -m coverage report --rcfile=scripts/coverage.toml --format=markdown --sort=cover
} > benchmarks/results/coverage.md
tail -3 benchmarks/results/coverage.md
