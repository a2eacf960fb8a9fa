#!/usr/bin/env bash
# Set up (first time) and run the whole CPU test suite. GPU-only tests (marker `gpu`) are deselected.
# Fails if no test ran or any test was skipped (see tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
exec .venv/bin/python -m pytest -m "not gpu" -q "$@"
