#!/usr/bin/env bash
# Benchmarks a running distrack stack over its HTTP API; the measuring is distrack/bench.py.
#
#   scripts/benchmark.sh [-u URL] [-n COUNT] [-d SEC] [-p SEC] [-t SEC] [-c CMD] [-h]
#                        [--concurrency N] [-i MS] [--json]
#
# Defaults: -u $SCHEDULER_URL or http://localhost:8081, -n 50, -d 0, -p 0.5, -t 120, -c 'echo benchmark'.
# Exit status: 0 every task completed, 1 some did not, 2 usage error or scheduler unreachable.
# The Python used is $DISTRACK_PYTHON, else the repository's .venv/bin/python, else python3; bench.py
# needs only the standard library, so any Python 3.11+ works.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${DISTRACK_PYTHON:-}" ]]; then
  py="$DISTRACK_PYTHON"
elif [[ -x "$repo/.venv/bin/python" ]]; then
  py="$repo/.venv/bin/python"
else
  py="python3"
fi

# This checkout's distrack comes first, whether or not (and whichever version) is installed.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export DISTRACK_BENCH_PROG="${DISTRACK_BENCH_PROG:-$(basename "$0")}"
exec "$py" -m distrack.bench "$@"
