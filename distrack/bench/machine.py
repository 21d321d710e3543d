"""What the machine spends: CPU from /proc/stat, this process's own CPU, each service's CPU (with what
it started) from /proc/PID/stat, the services' memory (RSS)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from distrack.bench.stats import thirds

# /proc/stat counts in clock ticks (USER_HZ), 100 a second on Linux.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# RSS is sampled twice a second: 60 samples over the 30 s sustained run, 20 in each third.
RSS_SAMPLE_S = 0.5
MIB = 1024 * 1024


@dataclass(frozen=True)
class CpuTimes:
    """Seconds of CPU, summed over every core since boot."""

    busy_s: float
    total_s: float
    # Time the hypervisor gave to other machines while this one wanted to run: a noisy host.
    steal_s: float = 0.0


def parse_proc_stat(text: str) -> CpuTimes:
    """The machine-wide `cpu` line of /proc/stat. Busy is user, nice, system, irq and softirq; idle
    and iowait are idle; steal (time the hypervisor gave to other machines) is neither, since no
    process here used it; guest time is already inside user and is not counted twice."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            ticks = [int(value) for value in fields[1:9]] + [0] * (9 - len(fields))
            user, nice, system, idle, iowait, irq, softirq, steal = ticks[:8]
            busy = user + nice + system + irq + softirq
            return CpuTimes(busy / CLOCK_TICKS, (busy + idle + iowait) / CLOCK_TICKS, steal / CLOCK_TICKS)
    raise ValueError("no cpu line in /proc/stat")


def read_cpu_times(path: str = "/proc/stat") -> CpuTimes | None:
    """The machine's CPU times now, or None where there is no /proc/stat."""
    try:
        with open(path) as file:
            return parse_proc_stat(file.read())
    except (OSError, ValueError):
        return None


def parse_process_stat(text: str) -> tuple[float, float]:
    """(CPU seconds of the process itself, CPU seconds of its children it has reaped) from
    /proc/PID/stat: utime + stime, and cutime + cstime. The command name, in parentheses, may hold
    spaces and parentheses itself, so the fields are counted from its last ')'."""
    fields = text.rsplit(")", 1)[1].split()
    # Fields 14 to 17 of proc(5) are the 12th to 15th after the name.
    utime, stime, cutime, cstime = (int(value) for value in fields[11:15])
    return (utime + stime) / CLOCK_TICKS, (cutime + cstime) / CLOCK_TICKS


def _children(pid: int) -> list[int]:
    children: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as file:
                children += [int(child) for child in file.read().split()]
    except OSError:
        pass
    return children


def tree_cpu_s(pid: int) -> float | None:
    """CPU seconds spent by a process, its live descendants and the ones already reaped (the kernel
    adds a reaped child's CPU to its parent's); None once the process is gone. A descendant that is
    reaped within a window is counted whole at the end, so windows should outlast the short-lived
    ones (a shell task's few milliseconds)."""
    total = None
    stack, seen = [pid], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            with open(f"/proc/{current}/stat") as file:
                own, reaped = parse_process_stat(file.read())
        except (OSError, ValueError, IndexError):
            if current == pid:
                return None
            continue  # it ended meanwhile: its parent has it, or will
        total = (total or 0.0) + own + reaped
        stack += _children(current)
    return total


def _trees_cpu_s(processes: Mapping[str, int]) -> dict[str, float]:
    return {name: cpu for name, pid in processes.items() if (cpu := tree_cpu_s(pid)) is not None}


@dataclass(frozen=True)
class CpuUsage:
    """CPU spent over one measured window."""

    wall_s: float
    # Every process on the machine (the stack, PostgreSQL, the tasks, this load generator, anything else).
    machine_busy_s: float | None
    # This process only: the load generator, or the reference's driver.
    client_s: float
    # Per process given to the meter (a service or PostgreSQL), with everything it started.
    by_process_s: dict[str, float] = field(default_factory=dict)

    def machine_ms_per(self, count: int) -> float | None:
        if self.machine_busy_s is None or count <= 0:
            return None
        return self.machine_busy_s * 1000 / count

    @property
    def client_share(self) -> float:
        """The load generator's CPU as a fraction of one core."""
        return self.client_s / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall_s, 4),
            "machine_busy_s": None if self.machine_busy_s is None else round(self.machine_busy_s, 4),
            "client_s": round(self.client_s, 4),
            "by_process_s": {name: round(seconds, 4) for name, seconds in self.by_process_s.items()},
        }


class CpuMeter:
    """Starts counting when made; `stop()` gives the CpuUsage since. `processes` (name -> PID) are
    also counted one by one, each with what it started."""

    def __init__(self, processes: Mapping[str, int] | None = None) -> None:
        self._processes = dict(processes or {})
        self._trees = _trees_cpu_s(self._processes)
        self._wall = time.monotonic()
        self._client = time.process_time()
        self._machine = read_cpu_times()

    def stop(self) -> CpuUsage:
        machine = read_cpu_times()
        client = time.process_time()
        trees = _trees_cpu_s(self._processes)
        busy = None if machine is None or self._machine is None else machine.busy_s - self._machine.busy_s
        by_process = {name: trees[name] - self._trees[name] for name in trees if name in self._trees}
        return CpuUsage(time.monotonic() - self._wall, busy, client - self._client, by_process)


def steal_share(before: CpuTimes | None, after: CpuTimes | None) -> float | None:
    """The share of the cores' time the hypervisor gave to other machines between two readings: the
    host's noise, which slows every figure of the run (none where the kernel does not count it)."""
    if before is None or after is None:
        return None
    steal = after.steal_s - before.steal_s
    elapsed = after.total_s - before.total_s + steal
    return steal / elapsed if elapsed > 0 else None


def machine_busy_fraction(window_s: float) -> float | None:
    """How busy the machine's cores were, 0..1, over the next `window_s` seconds."""
    before = read_cpu_times()
    time.sleep(window_s)
    after = read_cpu_times()
    if before is None or after is None or after.total_s <= before.total_s:
        return None
    return (after.busy_s - before.busy_s) / (after.total_s - before.total_s)


# --- memory --------------------------------------------------------------------------------------


# The services whose children running the same program are part of them: the scheduler's gunicorn
# workers. A distrack worker's children are its commands, and one caught between its spawn and its exec
# still runs the worker's program in the worker's own memory: counted, it adds the worker's whole RSS
# once more to that sample (it made a worker's last third look 5-16% bigger now and then).
SERVICES_WITH_WORKER_PROCESSES = ("scheduler",)


def service_rss(pid: int, with_children: bool = False) -> int | None:
    """RSS in bytes of a service's process, plus (with_children) that of its children running the same
    program. None once the process is gone."""
    import psutil  # installed with pgserver; only the suites need it

    try:
        process = psutil.Process(pid)
        total = process.memory_info().rss
        if not with_children:
            return total
        exe = process.exe()
        for child in process.children():
            try:
                if child.exe() == exe:
                    total += child.memory_info().rss
            except psutil.Error:
                continue
        return total
    except psutil.Error:
        return None


class RssSampler:
    """Samples each service's RSS every RSS_SAMPLE_S in a background thread, from start() to stop()."""

    def __init__(self, services: Mapping[str, int], interval_s: float = RSS_SAMPLE_S,
                 with_children: Collection[str] = SERVICES_WITH_WORKER_PROCESSES) -> None:
        self.services = dict(services)
        self.interval_s = interval_s
        self.with_children = frozenset(with_children)
        self.samples: list[dict[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> list[dict[str, int]]:
        self._stop.set()
        self._thread.join()
        return self.samples

    def _run(self) -> None:
        while True:
            sample = {name: rss for name, pid in self.services.items()
                      if (rss := service_rss(pid, name in self.with_children)) is not None}
            self.samples.append(sample)
            if self._stop.wait(self.interval_s):
                return


@dataclass(frozen=True)
class MemoryGrowth:
    """A service's mean RSS over the first and over the last third of a run, in MiB."""

    service: str
    first_mib: float
    last_mib: float
    samples: int

    @property
    def growth_mib(self) -> float:
        return self.last_mib - self.first_mib

    def to_dict(self) -> dict[str, Any]:
        return {"service": self.service, "first_third_mib": round(self.first_mib, 2),
                "last_third_mib": round(self.last_mib, 2), "growth_mib": round(self.growth_mib, 2),
                "samples": self.samples}


def memory_growth(samples: Sequence[Mapping[str, int]]) -> list[MemoryGrowth]:
    """Per service (in order of first appearance), its first-third and last-third mean RSS. A service
    with fewer than 3 samples (it vanished, or the run was too short) is left out."""
    names: dict[str, None] = {}
    for sample in samples:
        names.update(dict.fromkeys(sample))
    out = []
    for name in names:
        series = [sample[name] / MIB for sample in samples if name in sample]
        means = thirds(series)
        if means is not None:
            out.append(MemoryGrowth(name, means[0], means[1], len(series)))
    return out
