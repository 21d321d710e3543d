"""Compose-like hosts on one machine: one network namespace per service, names that resolve as in Compose.

Layout (all of it created and removed by `Network`):

    root namespace: bridge <prefix>br holding 198.18.N.1/24   (the test process talks through it)
      |-- veth <prefix>v1  <->  eth0 in namespace <prefix>-postgres     198.18.N.10
      |-- veth <prefix>v2  <->  eth0 in namespace <prefix>-coordinator  198.18.N.11
      ...

Network rules: addresses come from 198.18.0.0/15 only, N is random per run; no namespace gets a default
route; IPv6 is off on every interface made here. An `unreachable 198.18.0.0/15` route of our own (a
metric unique to this run, so concurrent runs never remove each other's) keeps packets for the range
from following the root namespace's default route off the machine when the bridge's /24 is missing.
A link is cut inside the host's namespace (its eth0 goes down), so the root namespace's routes stay.

`ip netns exec NS cmd` bind-mounts /etc/netns/NS/hosts over /etc/hosts for `cmd`: every namespace
gets one that names every host (`postgres`, `coordinator`, `worker-1`...).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SUPERNET = "198.18.0.0/15"
NETNS_ETC = Path("/etc/netns")


class NetnsError(RuntimeError):
    pass


def run(*argv: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} exited with {proc.returncode}: {proc.stderr.strip()}")
    return proc


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (not root, no `ip`, `ip netns add` refused), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    probe = f"dtprobe{os.getpid()}{secrets.token_hex(2)}"
    added = run("ip", "netns", "add", probe, check=False)
    if added.returncode != 0:
        return f"`ip netns add` failed: {added.stderr.strip()}"
    run("ip", "netns", "del", probe, check=False)
    return None


@dataclass
class Host:
    name: str  # the Compose service name other hosts use, e.g. "worker-1"
    ns: str
    ip: str
    root_if: str  # the veth end enslaved to the bridge, in the root namespace
    ifname: str = "eth0"  # the veth end inside the namespace


class Network:
    """A bridge, one namespace per host, their hosts files; `teardown()` removes all of it (and the
    processes started with `popen`), whatever state setup reached."""

    def __init__(self) -> None:
        # Interface names are at most 15 characters: prefix (<= 11) + "br" / "v<i>".
        self.prefix = f"dt{os.getpid()}{secrets.token_hex(2)}"[:11]
        self.bridge = f"{self.prefix}br"
        self.octet = 0
        self.hosts: dict[str, Host] = {}
        self.route_metric = 40000 + os.getpid() % 20000
        self.notes: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._undo: list[tuple[str, Callable[[], object]]] = []

    # --- addresses

    @property
    def subnet(self) -> str:
        return f"198.18.{self.octet}.0/24"

    @property
    def gateway(self) -> str:
        return f"198.18.{self.octet}.1"

    def _pick_octet(self) -> int:
        """A random /24 of 198.18.0.0/16 that no interface or route here uses yet."""
        used = run("ip", "-4", "-o", "addr").stdout + run("ip", "-4", "route", "show", "table", "all").stdout
        for _ in range(50):
            octet = secrets.randbelow(254) + 1
            if f"198.18.{octet}." not in used:
                return octet
        raise NetnsError("no free 198.18.N.0/24 found")

    # --- setup

    def up(self, names: list[str], first_host: int = 10) -> None:
        """Creates the bridge and one namespace per name (addresses .first_host, .first_host+1...)."""
        # First, before any address exists: nothing for 198.18.0.0/15 may leave by the default route.
        for _ in range(20):  # a metric of our own: a concurrent run's route stays its own
            added = run("ip", "route", "add", "unreachable", SUPERNET, "metric", str(self.route_metric), check=False)
            if added.returncode == 0:
                break
            if "exists" not in added.stderr:
                raise NetnsError(f"ip route add unreachable {SUPERNET}: {added.stderr.strip()}")
            self.route_metric = 40000 + secrets.randbelow(20000)
        else:
            raise NetnsError(f"no free metric for an unreachable {SUPERNET} route")
        self._on_teardown("unreachable route", lambda: run(
            "ip", "route", "del", "unreachable", SUPERNET, "metric", str(self.route_metric), check=False))
        self.octet = self._pick_octet()
        if not NETNS_ETC.exists():
            NETNS_ETC.mkdir(parents=True, exist_ok=True)
            # Last to go, and only if empty: a concurrent run may have its own folder in there.
            self._on_teardown("/etc/netns", lambda: _rmdir_quietly(NETNS_ETC))

        run("ip", "link", "add", self.bridge, "type", "bridge")
        self._on_teardown(f"bridge {self.bridge}", lambda: _delete_link(self.bridge))
        _disable_ipv6(self.bridge)
        run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        holders = [line for line in run("ip", "-4", "-o", "addr").stdout.splitlines()
                   if f" 198.18.{self.octet}." in line]
        if len(holders) != 1:  # a concurrent run picked the same /24 at the same moment
            raise NetnsError(f"{self.subnet} is used twice: {holders}")
        run("ip", "link", "set", self.bridge, "up")

        for i, name in enumerate(names):
            self._add_host(name, i + 1, f"198.18.{self.octet}.{first_host + i}")
        self._write_hosts_files()
        self._open_bridge_forwarding()

    def _add_host(self, name: str, index: int, ip: str) -> None:
        ns = f"{self.prefix}-{name}"
        root_if, peer = f"{self.prefix}v{index}", f"{self.prefix}p{index}"
        run("ip", "netns", "add", ns)
        self._on_teardown(f"namespace {ns}", lambda: run("ip", "netns", "del", ns, check=False))
        self._on_teardown(f"/etc/netns/{ns}", lambda: shutil.rmtree(NETNS_ETC / ns, ignore_errors=True))
        host = Host(name, ns, ip, root_if)
        self.hosts[name] = host
        self.exec(name, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
                  "net.ipv6.conf.default.disable_ipv6=1")
        run("ip", "link", "add", root_if, "type", "veth", "peer", "name", peer)
        # Deleting the root end takes the peer with it at once (a namespace's deletion is lazy).
        self._on_teardown(f"veth {root_if}", lambda: _delete_link(root_if))
        _disable_ipv6(root_if)
        run("ip", "link", "set", peer, "netns", ns)
        self.exec(name, "ip", "link", "set", peer, "name", host.ifname)
        self.exec(name, "ip", "addr", "add", f"{ip}/24", "dev", host.ifname)
        self.exec(name, "ip", "link", "set", "lo", "up")
        self.exec(name, "ip", "link", "set", host.ifname, "up")
        run("ip", "link", "set", root_if, "master", self.bridge, "up")
        routes = self.exec(name, "ip", "-4", "route").stdout
        if "default" in routes:
            raise NetnsError(f"namespace {ns} has a default route: {routes}")

    def _write_hosts_files(self) -> None:
        lines = ["127.0.0.1\tlocalhost", *(f"{h.ip}\t{h.name}" for h in self.hosts.values())]
        for host in self.hosts.values():
            folder = NETNS_ETC / host.ns
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text("\n".join(lines) + "\n")
            folder.chmod(0o755)
            (folder / "hosts").chmod(0o644)
            # A name missing from the hosts file must not go looking for the machine's DNS server.
            (folder / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
            (folder / "resolv.conf").chmod(0o644)

    def _open_bridge_forwarding(self) -> None:
        """With br_netfilter on, bridged frames go through iptables' FORWARD chain: if that drops by
        default, let this subnet's own traffic through (and take the rule out at teardown)."""
        try:
            calls = Path("/proc/sys/net/bridge/bridge-nf-call-iptables").read_text().strip()
        except OSError:
            return  # br_netfilter not loaded: bridged frames never see iptables
        iptables = shutil.which("iptables")
        if calls != "1" or iptables is None:
            return
        chain = run(iptables, "-w", "-S", "FORWARD", check=False).stdout
        if "-P FORWARD DROP" not in chain and " DROP" not in chain and " REJECT" not in chain:
            return
        rule = ["FORWARD", "-s", self.subnet, "-d", self.subnet, "-j", "ACCEPT"]
        run(iptables, "-w", "-I", *rule)
        self._on_teardown("iptables rule", lambda: run(iptables, "-w", "-D", *rule, check=False))
        self.notes.append(f"iptables FORWARD drops bridged traffic here: accepted {self.subnet} for the test")

    # --- use

    def ns_argv(self, name: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[name].ns, *argv]

    def exec(self, name: str, *argv: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
        return run(*self.ns_argv(name, *argv), check=check, timeout=timeout)

    def popen(self, name: str, argv: list[str], **kwargs: object) -> subprocess.Popen:
        """Starts `argv` inside the host's namespace, in a session of its own, with the host's name as its
        hostname (as a container has; `unshare --uts` then `exec`, so the PID is argv's); stopped at
        teardown."""
        if shutil.which("unshare"):
            argv = ["unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', name, *argv]
        proc = subprocess.Popen(self.ns_argv(name, *argv), start_new_session=True, **kwargs)  # type: ignore[arg-type]
        self._procs.append(proc)
        return proc

    def set_link(self, name: str, up: bool) -> None:
        """Cuts (or restores) a host's only link, from inside its namespace."""
        host = self.hosts[name]
        self.exec(name, "ip", "link", "set", host.ifname, "up" if up else "down")

    # --- teardown

    def _on_teardown(self, what: str, undo: Callable[[], object]) -> None:
        self._undo.append((what, undo))

    def teardown(self) -> list[str]:
        """Stops every process started here, then undoes setup in reverse order; returns the errors."""
        errors: list[str] = []
        for proc in reversed(self._procs):
            try:
                stop_process(proc)
            except Exception as exc:  # keep going: everything else must still be removed
                errors.append(f"process {proc.pid}: {exc}")
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
            except Exception as exc:
                errors.append(f"{what}: {exc}")
        return errors

    def leftovers(self) -> list[str]:
        """What of this run is still visible (namespaces, links, route, /etc/netns folders)."""
        found = []
        namespaces = run("ip", "netns", "list", check=False).stdout
        links = run("ip", "-o", "link", check=False).stdout
        routes = run("ip", "route", "show", "table", "all", check=False).stdout
        found += [f"namespace {line.split()[0]}" for line in namespaces.splitlines() if self.prefix in line]
        found += [f"link {line.split(':')[1].strip()}" for line in links.splitlines() if self.prefix in line]
        found += [f"route {line}" for line in routes.splitlines()
                  if f"metric {self.route_metric}" in line and SUPERNET in line]
        found += [f"folder {p}" for p in NETNS_ETC.glob(f"{self.prefix}-*")] if NETNS_ETC.exists() else []
        return found


def stop_process(proc: subprocess.Popen, timeout: float = 10.0, term: bool = True) -> None:
    """SIGTERM (unless the caller sent it already), then SIGKILL after `timeout`; then whatever is left
    of its session (it leads one)."""
    if proc.poll() is None:
        if term:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _delete_link(name: str) -> None:
    if run("ip", "link", "show", name, check=False).returncode == 0:
        run("ip", "link", "del", name)
    # Wait until it is really gone (a link can outlive a lazily destroyed namespace for a moment).
    deadline = time.monotonic() + 10
    while run("ip", "link", "show", name, check=False).returncode == 0:
        if time.monotonic() > deadline:
            raise NetnsError(f"link {name} still exists")
        time.sleep(0.05)


def _disable_ipv6(ifname: str) -> None:
    with contextlib.suppress(OSError):
        Path(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6").write_text("1")


def _rmdir_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()
