"""The SQL files: named queries from sql/queries.sql and the ordered migrations in sql/migrations/.

They ship inside the package as `distrack.sql`; in a source checkout that has not been installed,
they are read from the repository's sql/ folder.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from importlib.resources.abc import Traversable
from pathlib import Path

_HEADER = re.compile(r"^-- ([a-z_][a-z0-9_]*) --\s*$", re.MULTILINE)
MIGRATION_NAME = re.compile(r"^(\d{4})_[A-Za-z0-9_]+\.sql$")


def sql_root() -> Traversable:
    try:
        return importlib.resources.files("distrack.sql")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "sql"


def parse_queries(text: str) -> dict[str, str]:
    """Splits a file of `-- name --` blocks into {name: statement}."""
    parts = _HEADER.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        queries[name] = body.strip()
    return queries


@functools.cache
def queries() -> dict[str, str]:
    return parse_queries(sql_root().joinpath("queries.sql").read_text(encoding="utf-8"))


def migration_files(root: Traversable | None = None) -> list[tuple[str, str]]:
    """[(name, sql)] for every `NNNN_name.sql` under sql/migrations/ (and its folders), by name."""
    root = root or sql_root().joinpath("migrations")
    found: list[tuple[str, str]] = []

    def walk(folder: Traversable) -> None:
        for entry in folder.iterdir():
            if entry.is_dir():
                walk(entry)
            elif MIGRATION_NAME.match(entry.name):
                found.append((entry.name.removesuffix(".sql"), entry.read_text(encoding="utf-8")))

    walk(root)
    found.sort(key=lambda item: item[0])
    names = [name for name, _ in found]
    numbers = [name[:4] for name in names]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"two migrations share a number: {names}")
    return found
