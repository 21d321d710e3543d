"""The command line: every subcommand explains its options, and bad flags get a clear error."""

import subprocess
import sys

import pytest

from distrack.cli import build_parser
from distrack.config import Address, default_prefetch


@pytest.mark.parametrize(
    ("subcommand", "options"),
    [
        ("scheduler", ["--scheduler_port", "--statement_timeout_s"]),
        ("coordinator", ["--coordinator_port", "--poll_interval_s", "--heartbeat_interval_s", "--heartbeat_misses"]),
        ("worker", ["--worker_port", "--coordinator", "--output_dir", "--slots", "WORKER_ADDRESS"]),
        ("migrate", []),
        ("up", ["--workers", "--data_dir", "--host"]),
    ],
)
def test_help_explains_each_option(subcommand, options):
    out = subprocess.run([sys.executable, "-m", "distrack", subcommand, "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for option in options:
        assert option in out.stdout, option


def test_top_level_help_lists_subcommands_and_database_settings():
    out = subprocess.run([sys.executable, "-m", "distrack", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for word in ("scheduler", "coordinator", "worker", "migrate", "up", "DATABASE_URL", "POSTGRES_HOST"):
        assert word in out.stdout


@pytest.mark.parametrize("spelling", ["--scheduler_port={}", "--scheduler-port={}"])
@pytest.mark.parametrize(
    ("text", "expected"),
    [(":9001", Address("", 9001)), ("9001", Address("", 9001)), ("myhost:9001", Address("myhost", 9001))],
)
def test_seed_port_spellings(spelling, text, expected):
    args = build_parser().parse_args(["scheduler", spelling.format(text)])
    assert args.scheduler_port == expected


def test_worker_defaults_match_the_seed():
    args = build_parser().parse_args(["worker"])
    assert (args.worker_port, args.coordinator) == (Address("", 8000), (Address("", 8080),))
    assert (args.output_dir, args.slots) == ("worker_output", 5)


def test_prefetch_is_four_tasks_per_slot_unless_given():
    assert build_parser().parse_args(["worker"]).prefetch is None  # four times --slots, when it starts
    assert default_prefetch(3) == 12 and default_prefetch(10_000) == 10_000
    assert build_parser().parse_args(["worker", "--prefetch=0"]).prefetch == 0
    assert build_parser().parse_args(["up", "--prefetch=7"]).prefetch == 7


@pytest.mark.parametrize(
    "argv",
    [
        ["worker", "--worker_port=abc"],
        ["worker", "--slots=0"],
        ["worker", "--slots=10001"],
        ["worker", "--prefetch=-1"],
        ["worker", "--prefetch=two"],
        ["worker", "--prefetch=10001"],
        ["up", "--prefetch=-1"],
        ["worker", "--coordinator=:0"],
        ["coordinator", "--poll_interval_s=-1"],
        ["scheduler", "--scheduler_port=70000"],
        ["scheduler", "--statement_timeout_s=0"],
        ["scheduler", "--statement_timeout_s=soon"],
        ["scheduler", "--statement_timeout_s=nan"],
        ["scheduler", "--statement_timeout_s=2147484"],  # past PostgreSQL's 32-bit milliseconds
        ["nope"],
    ],
)
def test_bad_flags_exit_2_with_a_message(argv):
    out = subprocess.run([sys.executable, "-m", "distrack", *argv], capture_output=True, text=True)
    assert out.returncode == 2
    assert "error:" in out.stderr


def test_worker_and_coordinator_reliability_flags():
    args = build_parser().parse_args(["worker", "--task_timeout_s=2.5", "--shutdown_grace_s=0"])
    assert (args.task_timeout_s, args.shutdown_grace_s) == (2.5, 0.0)
    args = build_parser().parse_args(["coordinator", "--retry_delay_s=0.5", "--ack_timeout_s=3"])
    assert (args.retry_delay_s, args.ack_timeout_s) == (0.5, 3.0)


@pytest.mark.parametrize("argv", [["coordinator", "--retry_delay_s=3601"], ["worker", "--task_timeout_s=-1"],
                                  ["worker", "--shutdown_grace_s=nan"]])
def test_reliability_flags_out_of_range(argv):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)


def test_a_worker_may_be_given_several_coordinators():
    args = build_parser().parse_args(["worker", "--coordinator=c1:8080, c2:9090"])
    assert args.coordinator == (Address("c1", 8080), Address("c2", 9090))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--coordinator=c1:8080,:0"])


@pytest.mark.parametrize("subcommand", ["submit", "status", "cancel"])
def test_client_commands_explain_the_token_and_the_url(subcommand):
    out = subprocess.run([sys.executable, "-m", "distrack", subcommand, "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for word in ("DISTRACK_API_TOKEN", "DISTRACK_API_TOKEN_FILE", "SCHEDULER_URL", "--url"):
        assert word in out.stdout, word


def test_scheduler_help_explains_the_token():
    out = subprocess.run([sys.executable, "-m", "distrack", "scheduler", "--help"], capture_output=True, text=True)
    assert "DISTRACK_API_TOKEN" in out.stdout and "/health" in out.stdout


def test_freezing_the_startup_objects_takes_them_out_of_full_collections():
    import gc

    from distrack.process import freeze_startup_objects

    try:
        frozen = freeze_startup_objects()
        assert frozen == gc.get_freeze_count() > 1000  # every module and class loaded so far
        assert len(gc.get_objects(generation=2)) < frozen  # what a full collection still scans
    finally:
        gc.unfreeze()
