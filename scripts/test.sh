#!/usr/bin/env bash
# Runs the whole test suite: lint, then pytest (unit, database, processes, the whole stack).
#
#   ./scripts/test.sh            # everything
#   ./scripts/test.sh -k e2e     # any pytest arguments
#
# Makes a virtual environment in .venv on first use and installs distrack with its test extras into
# it (a real `pip install .`, so the tests exercise the package as users get it). Tests use an
# embedded PostgreSQL in a temporary folder, or the server in DATABASE_URL when that is set.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check '.[test]'
.venv/bin/ruff check distrack tests
exec .venv/bin/pytest "$@"
