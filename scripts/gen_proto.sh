#!/usr/bin/env bash
# Regenerates distrack/rpc/*_pb2*.py from proto/. The output is committed; tests/test_proto.py
# regenerates it into a temporary folder and fails on any difference.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
python -m grpc_tools.protoc -Iproto --python_out="$out" --grpc_python_out="$out" \
  proto/distrack/rpc/distrack.proto
