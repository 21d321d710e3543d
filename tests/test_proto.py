"""The committed gRPC code is exactly what proto/ generates."""

import subprocess
import sys
from pathlib import Path

from helpers import REPO

GENERATED = ("distrack/rpc/distrack_pb2.py", "distrack/rpc/distrack_pb2_grpc.py")


def test_generated_code_matches_the_proto(tmp_path: Path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{REPO / 'proto'}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(REPO / "proto/distrack/rpc/distrack.proto"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    for name in GENERATED:
        assert (tmp_path / name).read_text() == (REPO / name).read_text(), (
            f"{name} is stale: run scripts/gen_proto.sh and commit the result"
        )


def test_generated_stubs_import_from_the_package():
    from distrack.rpc import distrack_pb2, distrack_pb2_grpc

    assert distrack_pb2.TaskStatus.Name(distrack_pb2.COMPLETED) == "COMPLETED"
    assert hasattr(distrack_pb2_grpc, "WorkerStub") and hasattr(distrack_pb2_grpc, "CoordinatorStub")
