#!/usr/bin/env bash
# Benchmarks distrack over its HTTP API; the measuring is the Python package distrack/bench/.
#
# The seed's single run, against a running stack:
#   scripts/benchmark.sh [-u URL] [-n COUNT] [-d SEC] [-p SEC] [-t SEC] [-c CMD] [-h]
#                        [--concurrency N] [-i MS] [--json]
#   Defaults: -u $SCHEDULER_URL or http://localhost:8081, -n $NUM_TASKS or 50, -d $DELAY_SECONDS or 0,
#   -p 0.5, -t 120, -c 'echo benchmark', --concurrency $CONCURRENCY or 10.
#   Exit status: 0 every task completed, 1 some did not, 2 usage error or scheduler unreachable.
#
# The suites (issue 4), each figure beside a reference measured in the same run and its target:
#   scripts/benchmark.sh --suite all|throughput|latency|sustained|scaling|scale-rows[,...] [--json]
#                        [-u URL] [-n COUNT] [-d SEC] [-c CMD] [--concurrency N] [-w N]
#                        [--rate TASKS_PER_S] [--duration SEC]
#   Environment: SCHEDULER_URL, NUM_TASKS (100), DELAY_SECONDS (1), CONCURRENCY (10), WORKER_COUNT (3).
#   Without -u or $SCHEDULER_URL the suites start their own `distrack up` on free ports with a
#   temporary embedded PostgreSQL and stop it afterwards (the scaling suite always does).
#   Exit status: 0 every task completed, 1 some did not, 2 usage error or no stack.
#
# Both modes send DISTRACK_API_TOKEN (or the contents of the file DISTRACK_API_TOKEN_FILE names) as
# `Authorization: Bearer <token>` when set.
#
# The Python used is $DISTRACK_PYTHON, else the repository's .venv/bin/python, else python3. The
# single run needs only the standard library; the suites need distrack's dependencies installed.
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
