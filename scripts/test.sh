#!/usr/bin/env bash
# Install dvprobe with every extra the tests need into .venv and run the test suite.
# This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -c scripts/constraints.txt -e ".[convert,dev]"
.venv/bin/python -m ruff check .
.venv/bin/python -m pytest -q "$@"
