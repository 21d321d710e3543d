"""Who a worker is: an id unique to each process start, and an address other hosts can dial."""

from __future__ import annotations

import re
import socket
import uuid

from distrack.config import Address

_UNSAFE = re.compile(r"[^A-Za-z0-9.-]+")


def new_worker_id(port: int) -> str:
    """`<host>-<port>-<random>`: readable in logs, safe in a file name, new at every start."""
    host = _UNSAFE.sub("-", socket.gethostname()).strip("-")[:40] or "worker"
    return f"{host}-{port}-{uuid.uuid4().hex[:8]}"


def advertised_address(listen: Address, port: int, coordinator: Address, worker_address: str | None) -> str:
    """The host:port the coordinator should dial (SPEC.md, `WORKER_ADDRESS`).

    With `WORKER_ADDRESS` set, that host and our port. Else a specific listen host, if one was
    given. Else the local address of the route towards the coordinator: reachable by it, and
    distinct per container under `docker compose --scale`. Never 0.0.0.0.
    """
    if worker_address:
        return f"{_host(worker_address)}:{port}"
    if listen.host and listen.host not in ("0.0.0.0", "::"):
        return f"{_host(listen.host)}:{port}"
    return f"{_host(route_source_ip(coordinator.host or 'localhost', coordinator.port))}:{port}"


def route_source_ip(host: str, port: int) -> str:
    """The local IP the kernel would use to reach host:port (a UDP connect sends nothing)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror:
        infos = []
    for family, _, _, _, sockaddr in infos:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect(sockaddr)
                ip = probe.getsockname()[0]
        except OSError:
            continue
        if ip not in ("0.0.0.0", "::"):
            return ip
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
