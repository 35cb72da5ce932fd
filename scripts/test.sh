#!/usr/bin/env bash
# Install dvprobe with every extra the tests need into .venv and run the test suite.
# This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -c scripts/constraints.txt -e ".[convert,dev,scale]"
# Headless Chromium for tests/test_report.py (opens the offline HTML report, checks every
# Vega view rendered, no console errors, no network requests, non-blank screenshot). Installed
# from Debian only when missing and in CI or as root; without it that test skips with a reason.
if ! command -v chromium >/dev/null 2>&1 && { [ "${CI:-}" = "true" ] || [ "$(id -u)" = 0 ]; }; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null \
    || echo "warning: could not install chromium; the report browser test will be skipped" >&2
fi
.venv/bin/python -m ruff check .
# Layers and import rules (docs/architecture.md; contracts in pyproject.toml): a wrong-way
# import or an import cycle fails here, before the tests run.
.venv/bin/lint-imports --no-cache
.venv/bin/python -m pytest -q "$@"
