"""The HTTP API's bearer token, from the environment when a process starts.

Standard library only, apart from distrack.errors: the benchmark's single run (scripts/benchmark.sh
with a bare python3) reads the token too, and distrack.config imports grpc (the cluster's transport).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from distrack.errors import ConfigError

TOKEN_ENV = "DISTRACK_API_TOKEN"
TOKEN_FILE_ENV = "DISTRACK_API_TOKEN_FILE"
# Printable ASCII without spaces: what any HTTP client can send in `Authorization: Bearer <token>`
# unchanged, and what `openssl rand -hex 32` or `secrets.token_urlsafe()` produce.
_TOKEN_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F))


def api_token_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """The HTTP API's bearer token: `DISTRACK_API_TOKEN`, or the contents of the file named by
    `DISTRACK_API_TOKEN_FILE`; None when neither is set (an empty variable counts as unset).

    Raises ConfigError when both are set, or the file is unreadable, empty or holds characters a
    header cannot carry, so a service never starts unprotected by mistake. The message never
    contains the token. Surrounding whitespace is ignored, as for the cluster token
    (distrack.transport), so both secrets can be written the same way.
    """
    env = os.environ if env is None else env
    token = env.get(TOKEN_ENV, "").strip()
    path = env.get(TOKEN_FILE_ENV, "").strip()
    if token and path:
        raise ConfigError("both DISTRACK_API_TOKEN and DISTRACK_API_TOKEN_FILE are set; set only one")
    source = "DISTRACK_API_TOKEN"
    if path:
        source = f"DISTRACK_API_TOKEN_FILE ({path})"
        try:
            with open(path, encoding="utf-8") as handle:
                token = handle.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
            raise ConfigError(f"cannot read the API token from {source}: {reason}") from None
        if not token:
            raise ConfigError(f"the API token file {path} is empty")
    if not token:
        return None
    if not set(token) <= _TOKEN_CHARS:
        raise ConfigError(f"the API token in {source} must be printable ASCII without spaces or line breaks "
                          "(e.g. from `openssl rand -hex 32`)")
    return token
