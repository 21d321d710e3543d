"""Checks Dockerfile, docker-compose.yml and .dockerignore by reading them (no Docker engine needed).

The compose commands are fed to the real `distrack` argument parser, so a flag that the CLI does not
have (or a renamed subcommand) fails here rather than in a container that exits at start-up.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from distrack.cli import build_parser
from distrack.config import (
    DEFAULT_COORDINATOR_PORT,
    DEFAULT_SCHEDULER_PORT,
    DEFAULT_WORKER_PORT,
    database_url_from_env,
    parse_address,
)
from distrack.db.queries import migration_files

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
MIGRATIONS = ROOT / "sql" / "migrations"

APP_SERVICES = ("migrate", "scheduler", "coordinator", "worker")
LONG_RUNNING = ("postgres", "scheduler", "coordinator", "worker")
# service -> the distrack subcommand it runs
SUBCOMMANDS = {"migrate": "migrate", "scheduler": "scheduler", "coordinator": "coordinator", "worker": "worker"}
OUTPUT_DIR = "/app/output"
MIGRATION_FILE = re.compile(r"^\d{4}_[A-Za-z0-9_]+\.sql$")


# --- helpers: compose ---------------------------------------------------------------------------

_VARIABLE = re.compile(
    r"\$\$"
    r"|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def expand(text: str, env: Mapping[str, str]) -> str:
    """Compose-style interpolation: `$$`, `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`,
    `${VAR:?error}`, `${VAR?error}`. Unset variables without a default become ''."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        op, arg = match.group("op"), match.group("arg")
        value = env.get(name)
        missing = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in (":-", "-"):
            return arg if missing else value
        if op in (":?", "?"):
            if missing:
                raise ValueError(f"${{{name}}} is required: {arg}")
            return value
        return value or ""

    result = _VARIABLE.sub(substitute, text)
    if "${" in result:
        raise ValueError(f"unsupported interpolation in {text!r}")
    return result


def _expand_all(node: object, env: Mapping[str, str]) -> object:
    if isinstance(node, str):
        return expand(node, env)
    if isinstance(node, list):
        return [_expand_all(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _expand_all(value, env) for key, value in node.items()}
    return node


def load_compose(env: Mapping[str, str] | None = None) -> dict:
    """docker-compose.yml with YAML anchors merged and variables expanded against `env` ({}: defaults)."""
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return _expand_all(data, env or {})


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def command_of(service: dict) -> list[str]:
    command = service.get("command")
    assert command, "service has no command"
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def environment_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.partition("=") for item in env)
        return {key: value for key, sep, value in pairs if sep}
    return {key: "" if value is None else str(value) for key, value in env.items()}


def ports_of(service: dict) -> list[tuple[int, int]]:
    """[(published, target)] for the short (`[ip:]host:container[/proto]`) and long syntax."""
    found = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            found.append((int(entry["published"]), int(entry["target"])))
            continue
        parts = str(entry).split("/")[0].split(":")
        assert len(parts) >= 2, f"port {entry!r} publishes a random host port"
        found.append((int(parts[-2]), int(parts[-1])))
    return found


def volumes_of(service: dict) -> list[tuple[str, str, bool]]:
    """[(source, target, read_only)] for the short (`src:dst[:mode]`) and long syntax."""
    found = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            found.append((str(entry.get("source", "")), entry["target"], bool(entry.get("read_only"))))
            continue
        parts = str(entry).split(":")
        mode = parts[2] if len(parts) > 2 else ""
        found.append((parts[0], parts[1], "ro" in mode.split(",")))
    return found


def depends_on_of(service: dict) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def parse_cli(argv: list[str]):
    """The real CLI's parse; a flag or subcommand it does not know fails the test."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"`distrack {shlex.join(argv)}` is rejected by distrack.cli (exit {exc.code})")


def port_of(value: object) -> int:
    if isinstance(value, int):
        return value
    if hasattr(value, "port"):
        return value.port
    return parse_address(str(value)).port


def host_of(value: object) -> str:
    if hasattr(value, "host"):
        return value.host
    return str(value).rpartition(":")[0]


# --- helpers: Dockerfile and .dockerignore ---------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] with line continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return instructions


def _args(rest: str) -> list[str]:
    """An instruction's arguments in exec (JSON) or shell form."""
    if rest.startswith("["):
        return json.loads(rest)
    return shlex.split(rest)


def _last(instructions: list[tuple[str, str]], keyword: str) -> str | None:
    values = [rest for kw, rest in instructions if kw == keyword]
    return values[-1] if values else None


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """[(negated, regex)] in file order."""
    patterns = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        line = line.lstrip("!").strip()
        line = line.removeprefix("./").strip("/")
        patterns.append((negated, _ignore_regex(line)))
    return patterns


def ignored(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the build context leaves out `path` (a pattern on a folder covers what is inside)."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, regex in patterns:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def context_files(source: str) -> list[str]:
    """The repository files a COPY source stands for (source files only, not build leftovers)."""
    path = ROOT / source
    if path.is_file():
        return [source.strip("/")]
    assert path.is_dir(), f"COPY source {source!r} does not exist in the repository"
    return sorted(
        str(file.relative_to(ROOT))
        for file in path.rglob("*")
        if file.is_file() and file.suffix in {".py", ".sql", ".cfg", ".toml", ".md"} and "__pycache__" not in file.parts
    )


# --- docker-compose.yml ----------------------------------------------------------------------------


def test_compose_defines_every_service(services):
    assert {"postgres", "migrate", "scheduler", "coordinator", "worker"} <= set(services)


@pytest.mark.parametrize("name", APP_SERVICES)
def test_service_command_is_accepted_by_the_real_cli(services, name):
    argv = command_of(services[name])
    assert argv[0] == SUBCOMMANDS[name], f"{name} runs `distrack {argv[0]}`"
    assert parse_cli(argv).command == SUBCOMMANDS[name]
    # The image's ENTRYPOINT supplies `distrack`; repeating it would be taken as a subcommand.
    assert "distrack" not in argv


@pytest.mark.parametrize(
    ("name", "flag", "default"),
    [
        ("scheduler", "scheduler_port", DEFAULT_SCHEDULER_PORT),
        ("coordinator", "coordinator_port", DEFAULT_COORDINATOR_PORT),
    ],
)
def test_published_port_is_the_one_the_service_listens_on(services, name, flag, default):
    args = parse_cli(command_of(services[name]))
    listen = port_of(getattr(args, flag))
    cli_default = port_of(getattr(parse_cli([SUBCOMMANDS[name]]), flag))
    assert listen == cli_default == default
    assert ports_of(services[name]) == [(default, default)]


def test_worker_is_internal_and_scalable(services):
    worker = services["worker"]
    # A host port would make `docker compose up --scale worker=n` collide on that port.
    assert not worker.get("ports"), "the worker must not publish a host port"
    args = parse_cli(command_of(worker))
    assert port_of(args.worker_port) == port_of(parse_cli(["worker"]).worker_port) == DEFAULT_WORKER_PORT
    assert [str(port) for port in worker.get("expose") or []] == [str(DEFAULT_WORKER_PORT)]


def test_worker_dials_the_coordinator_service(services):
    args = parse_cli(command_of(services["worker"]))
    coordinator_listen = port_of(parse_cli(command_of(services["coordinator"])).coordinator_port)
    (coordinator,) = args.coordinator  # one coordinator service
    assert host_of(coordinator) == "coordinator"
    assert port_of(coordinator) == coordinator_listen == DEFAULT_COORDINATOR_PORT


def test_worker_does_not_set_worker_address(compose, services):
    # One shared name would resolve to every replica in turn; each worker must advertise its own IP.
    assert "WORKER_ADDRESS" not in environment_of(services["worker"])
    assert "WORKER_ADDRESS" not in json.dumps(compose["services"]["worker"])


def test_worker_output_goes_to_the_mounted_folder(services):
    worker = services["worker"]
    assert parse_cli(command_of(worker)).output_dir == OUTPUT_DIR
    mounts = {target: source for source, target, _ in volumes_of(worker)}
    assert OUTPUT_DIR in mounts, "nothing is mounted at /app/output"
    assert (ROOT / mounts[OUTPUT_DIR]).resolve() == ROOT / "worker_output"


def test_worker_can_write_its_output_folder(services):
    # A bind-mounted host folder keeps its host owner (root when Docker creates it), so an image
    # that runs as an unprivileged user needs the worker to run as root unless told otherwise.
    image_user = _last(dockerfile_instructions(), "USER")
    if image_user not in (None, "root", "0", "0:0"):
        assert services["worker"].get("user") in ("root", "0", "0:0"), (
            f"the image runs as {image_user!r}, which cannot write a root-owned ./worker_output"
        )


def test_postgres_service(compose, services):
    postgres = services["postgres"]
    image = postgres["image"]
    assert re.fullmatch(r"postgres:16(\.\d+)?(-[a-z0-9.]+)?", image), image
    test = postgres["healthcheck"]["test"]
    test_text = test if isinstance(test, str) else " ".join(test)
    assert "pg_isready" in test_text
    # Over TCP: the image's init phase runs a socket-only server that pg_isready would call ready.
    assert " -h " in f" {test_text} "
    data = {target: source for source, target, _ in volumes_of(postgres)}
    assert "/var/lib/postgresql/data" in data
    assert data["/var/lib/postgresql/data"] in (compose.get("volumes") or {}), "data is not in a named volume"


def test_postgres_applies_only_the_migrations_at_init(services):
    mounts = volumes_of(services["postgres"])
    init = [(source, ro) for source, target, ro in mounts if target.startswith("/docker-entrypoint-initdb.d")]
    assert len(init) == 1, init
    source, read_only = init[0]
    assert (ROOT / source).resolve() == MIGRATIONS
    assert read_only
    assert not any("queries.sql" in source for source, _, _ in mounts)


def test_migrations_folder_holds_only_migrations():
    # The postgres image runs every *.sql at the top of /docker-entrypoint-initdb.d (and no subfolder),
    # so the folder must hold exactly the files `distrack migrate` applies, and nothing else.
    entries = sorted(MIGRATIONS.iterdir())
    assert entries, "sql/migrations is empty"
    for entry in entries:
        assert entry.is_file() and MIGRATION_FILE.match(entry.name), f"not a migration: {entry.name}"
    names = [entry.name.removesuffix(".sql") for entry in entries]
    assert [name for name, _ in migration_files(MIGRATIONS)] == names


@pytest.mark.parametrize("path", sorted(MIGRATIONS.glob("*.sql")), ids=lambda p: p.name)
def test_migration_records_itself(path):
    # Applied by initdb, a migration must still be recorded so that `distrack migrate` skips it.
    text = path.read_text(encoding="utf-8")
    name = path.name.removesuffix(".sql")
    assert re.search(rf"INSERT\s+INTO\s+distrack_migrations\b[^;]*'{re.escape(name)}'", text, re.IGNORECASE)


# The services that use PostgreSQL; a worker never does.
DATABASE_SERVICES = ("migrate", "scheduler", "coordinator")


@pytest.mark.parametrize("name", DATABASE_SERVICES)
def test_service_reaches_the_compose_database(name):
    env = environment_of(load_compose({})["services"][name])
    assert env.get("POSTGRES_HOST") == "postgres"
    assert database_url_from_env(env) == "postgresql://distrack:distrack@postgres:5432/distrack"


@pytest.mark.parametrize("name", DATABASE_SERVICES)
def test_database_credentials_come_from_the_environment(name):
    host_env = {"POSTGRES_DB": "jobs", "POSTGRES_USER": "alice", "POSTGRES_PASSWORD": "p@ss word"}
    expanded = load_compose(host_env)["services"]
    postgres = environment_of(expanded["postgres"])
    assert {key: postgres.get(key) for key in host_env} == host_env
    env = environment_of(expanded[name])
    assert database_url_from_env(env) == "postgresql://alice:p%40ss%20word@postgres:5432/jobs"


@pytest.mark.parametrize("name", ("scheduler", "coordinator", "worker"))
def test_services_wait_for_the_schema(services, name):
    deps = depends_on_of(services[name])
    assert deps.get("migrate") == "service_completed_successfully"
    assert deps.get("postgres") == "service_healthy"


def test_migrate_runs_once_after_postgres_is_healthy(services):
    migrate = services["migrate"]
    assert depends_on_of(migrate).get("postgres") == "service_healthy"
    # A one-shot service that restarts never counts as completed.
    assert str(migrate.get("restart", "no")) in ("no", "on-failure", "False")


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_services_restart(services, name):
    assert services[name].get("restart") == "unless-stopped"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_use_this_repository_image(services, name):
    build = services[name].get("build")
    context = build if isinstance(build, str) else (build or {}).get("context")
    assert context is not None and (ROOT / context).resolve() == ROOT


# --- Dockerfile ------------------------------------------------------------------------------------


def test_dockerfile_base_image():
    froms = [rest for kw, rest in dockerfile_instructions() if kw == "FROM"]
    match = re.match(r"(?:docker\.io/)?(?:library/)?python:3\.(\d+)", froms[-1].split()[0])
    assert match and int(match.group(1)) >= 11, froms[-1]


def test_dockerfile_installs_the_package():
    runs = [rest for kw, rest in dockerfile_instructions() if kw == "RUN"]
    installs = [shlex.split(rest) for rest in runs if "pip install" in rest]
    assert any("." in argv for argv in installs), "no `pip install .`"
    assert all("--no-cache-dir" in argv for argv in installs), "pip installs must not keep a cache"


def test_dockerfile_copies_what_pip_install_needs():
    sources: set[str] = set()
    for kw, rest in dockerfile_instructions():
        if kw in ("COPY", "ADD"):
            args = [arg for arg in _args(rest) if not arg.startswith("--")]
            sources.update(arg.strip("/") or "." for arg in args[:-1])
    # README.md is setup.cfg's long_description; sql/ becomes distrack.sql.
    needed = {"pyproject.toml", "setup.cfg", "README.md", "distrack", "sql"}
    assert "." in sources or needed <= sources, f"missing from COPY: {needed - sources}"


def test_dockerfile_caches_dependencies_before_the_source():
    instructions = dockerfile_instructions()
    first_install = next(i for i, (kw, rest) in enumerate(instructions) if kw == "RUN" and "pip install" in rest)
    copy_code = next(
        i
        for i, (kw, rest) in enumerate(instructions)
        if kw == "COPY" and any(arg.strip("/") in ("distrack", ".") for arg in _args(rest)[:-1])
    )
    assert first_install < copy_code, "dependencies are reinstalled on every code change"


def test_dockerfile_dependency_list_matches_setup_cfg():
    # The dependency layer reads install_requires out of setup.cfg with a `python -c` one-liner: run it.
    setupcfg = pytest.importorskip("setuptools.config.setupcfg")
    run = next(rest for kw, rest in dockerfile_instructions() if kw == "RUN" and "setup.cfg" in rest)
    argv = shlex.split(run)
    code = argv[argv.index("-c") + 1]
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    listed = [line.strip() for line in out.stdout.splitlines() if line.strip() and not line.startswith("#")]
    expected = setupcfg.read_configuration(ROOT / "setup.cfg")["options"]["install_requires"]
    assert sorted(listed) == sorted(expected)


def test_dockerfile_entrypoint_is_distrack_and_cmd_is_valid():
    instructions = dockerfile_instructions()
    assert _args(_last(instructions, "ENTRYPOINT") or "[]") == ["distrack"]
    cmd = _args(_last(instructions, "CMD") or "[]")
    if "--help" in cmd or "-h" in cmd:
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(cmd)
        assert exc.value.code == 0
    else:
        parse_cli(cmd)


def test_dockerfile_exposes_the_three_ports():
    exposed = set()
    for kw, rest in dockerfile_instructions():
        if kw == "EXPOSE":
            exposed.update(int(port.split("/")[0]) for port in rest.split())
    assert exposed == {DEFAULT_SCHEDULER_PORT, DEFAULT_COORDINATOR_PORT, DEFAULT_WORKER_PORT}


def test_dockerfile_environment_and_workdir():
    env: dict[str, str] = {}
    for kw, rest in dockerfile_instructions():
        if kw == "ENV":
            tokens = shlex.split(rest)
            if tokens and "=" not in tokens[0]:
                env[tokens[0]] = " ".join(tokens[1:])
            else:
                env.update(token.split("=", 1) for token in tokens)
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert _last(dockerfile_instructions(), "WORKDIR") == "/app"


# --- .dockerignore ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        ".git",
        ".git/HEAD",
        ".venv/bin/python",
        "worker_output/w1_t1.txt",
        "__pycache__/x.cpython-311.pyc",
        "distrack/__pycache__/cli.cpython-311.pyc",
        "distrack/db/__pycache__/store.cpython-311.pyc",
    ],
)
def test_dockerignore_leaves_out_local_state(path):
    assert ignored(path, dockerignore_patterns()), f"{path} would be sent to the build"


def test_dockerignore_keeps_everything_the_dockerfile_copies():
    patterns = dockerignore_patterns()
    copied: list[str] = []
    for kw, rest in dockerfile_instructions():
        if kw in ("COPY", "ADD"):
            args = [arg for arg in _args(rest) if not arg.startswith("--")]
            for source in args[:-1]:
                copied.extend(context_files(source))
    assert {"README.md", "setup.cfg", "distrack/cli.py", "sql/queries.sql"} <= set(copied)
    left_out = [path for path in copied if ignored(path, patterns)]
    assert not left_out, f".dockerignore leaves out files the Dockerfile copies: {left_out}"


def test_coordinator_and_workers_share_the_cluster_token_from_the_environment():
    from distrack.transport import security_from_env

    token = "0123456789abcdef0123456789abcdef"
    expanded = load_compose({"DISTRACK_CLUSTER_TOKEN": token})["services"]
    for name in ("coordinator", "worker"):
        assert security_from_env(environment_of(expanded[name])).token == token, name
    # The scheduler speaks no gRPC: it has no use for the token.
    assert "DISTRACK_CLUSTER_TOKEN" not in environment_of(expanded["scheduler"])
    # Unset on the host, it is an empty variable, which means no token (not a start-up error).
    for name in ("coordinator", "worker"):
        assert security_from_env(environment_of(load_compose({})["services"][name])).token is None


def test_workers_hold_no_database_credentials_a_task_could_find(services):
    env = environment_of(services["worker"])
    assert database_url_from_env(env) is None
    assert not [key for key in env if key.startswith(("POSTGRES_", "PG")) or key == "DATABASE_URL"]


def test_tasks_run_in_a_folder_any_worker_user_can_create(services):
    # WORKER_USER may be any uid, which cannot create folders in /app (owned by the image's user).
    task_dir = parse_cli(command_of(services["worker"])).task_dir
    assert task_dir and task_dir.startswith("/tmp/")


def test_the_scheduler_gets_the_api_token_from_the_environment():
    env = environment_of(load_compose({"DISTRACK_API_TOKEN": "s3cret"})["services"]["scheduler"])
    assert env["DISTRACK_API_TOKEN"] == "s3cret"
    # Unset, it is empty, which the scheduler takes as no token (distrack.apitoken.api_token_from_env).
    assert environment_of(load_compose({})["services"]["scheduler"])["DISTRACK_API_TOKEN"] == ""
