"""`distrack submit`, `distrack status` and `distrack cancel`: the scheduler's HTTP API from a shell.

The token and the URL come from the environment when the command runs (DISTRACK_API_TOKEN or
DISTRACK_API_TOKEN_FILE, SCHEDULER_URL), like the services' own settings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from distrack.apitoken import api_token_from_env
from distrack.bench.client import ApiError, SchedulerClient, TransportError, normalize_url
from distrack.errors import ConfigError

DEFAULT_URL = "http://localhost:8081"


def run_client(args: argparse.Namespace) -> int:
    """Sends one request; prints the task as JSON (0), or why not to stderr (1)."""
    token = api_token_from_env()
    text = args.url or os.environ.get("SCHEDULER_URL") or DEFAULT_URL
    try:
        url = normalize_url(text)
    except ValueError as exc:
        raise ConfigError(f"scheduler URL: {exc}") from None
    client = SchedulerClient(url, token=token)
    try:
        doc = _send(client, args)
    except ApiError as exc:
        hint = " (set DISTRACK_API_TOKEN or DISTRACK_API_TOKEN_FILE)" if exc.status == 401 and not token else ""
        print(f"distrack {args.command}: {exc}{hint}", file=sys.stderr)
        return 1
    except TransportError as exc:
        print(f"distrack {args.command}: cannot reach the scheduler at {url}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(json.dumps(doc, indent=2))
    return 0


def _send(client: SchedulerClient, args: argparse.Namespace) -> dict[str, Any]:
    if args.command == "submit":
        body: dict[str, Any] = {"command": args.task_command, "delay_seconds": args.delay_seconds}
        if args.max_attempts is not None:
            body["max_attempts"] = args.max_attempts
        if args.timeout_seconds is not None:
            body["timeout_seconds"] = args.timeout_seconds
        return client.post("/schedule", json.dumps(body).encode())
    if args.command == "status":
        return client.status(args.task_id)
    return client.cancel(args.task_id)
