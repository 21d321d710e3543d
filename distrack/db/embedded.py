"""The embedded PostgreSQL of `distrack up` (the pgserver package), kept in a data directory."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import platformdirs


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("distrack")) / "pgdata"


class EmbeddedPostgres:
    """Starts (or joins) a PostgreSQL server on `data_dir`, reachable over a Unix socket."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self._server = None

    def start(self) -> str:
        # pgserver logs every pg_ctl call at INFO, and platformdirs warns that no XDG_RUNTIME_DIR is
        # set on servers; neither is news to a user.
        logging.getLogger("pgserver").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import pgserver  # imported here: only `distrack up` and the tests need it

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._server = pgserver.get_server(self.data_dir, cleanup_mode="stop")
        return self.url()

    def url(self, database: str = "postgres") -> str:
        assert self._server is not None, "start() first"
        return self._server.get_uri(database)

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
