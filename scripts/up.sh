#!/usr/bin/env bash
# Starts the whole distrack stack on this machine: `distrack up` on the embedded PostgreSQL.
#
#   ./scripts/up.sh                 # coordinator, 3 workers, scheduler on :8081
#   ./scripts/up.sh --workers 5     # any `distrack up` option
#
# Makes a virtual environment in .venv and installs distrack into it on first use (or when the
# sources are newer than the install).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
fi
stamp=.venv/.distrack-installed
if [[ ! -f "$stamp" || -n "$(find setup.cfg pyproject.toml distrack sql -newer "$stamp" -print -quit)" ]]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check .
  touch "$stamp"
fi
exec .venv/bin/distrack up "$@"
