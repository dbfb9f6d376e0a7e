"""Statistics, per-process CPU time from /proc, sockets per process, and machine facts.

Linux only: CPU time and sockets are read from /proc.
"""

from __future__ import annotations

import os
import platform
import re
import socket
import statistics
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
MICROSECONDS_PER_TICK = 1_000_000 / CLOCK_TICKS_PER_S

# State codes of /proc/net/tcp, from include/net/tcp_states.h.
TCP_ESTABLISHED = "01"
TCP_LISTEN = "0A"


@dataclass(frozen=True)
class Summary:
    """Median and range of the values of several rounds."""

    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        if not values:
            raise ValueError("no values to summarize")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def format(self, digits: int = 0, unit: str = "") -> str:
        """Format as `median (low–high)`, like `2,350 (2,210–2,480)`."""
        def number(value: float) -> str:
            return f"{value:,.{digits}f}{unit}"

        return f"{number(self.median)} ({number(self.low)}–{number(self.high)})"


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> Summary:
    """Summarize the ratio of each round's pair, so slow phases of a noisy machine cancel out.

    Rounds alternate between the variants, so round i of one variant ran right next to
    round i of the other.
    """
    if len(numerators) != len(denominators):
        raise ValueError(f"{len(numerators)} numerators but {len(denominators)} denominators")
    return Summary.of([n / d for n, d in zip(numerators, denominators, strict=True) if d])


def paired_differences(minuends: Sequence[float], subtrahends: Sequence[float]) -> Summary:
    return Summary.of([a - b for a, b in zip(minuends, subtrahends, strict=True)])


# --- CPU time of processes ----------------------------------------------------------------


def cpu_ticks(pid: int) -> int:
    """Return utime + stime of process `pid`, all its threads together, in clock ticks."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name in brackets may contain spaces, so fields are counted after it.
    fields = text[text.rindex(")") + 2:].split()
    # utime and stime are fields 14 and 15 in proc(5), and fields[0] here is field 3.
    return int(fields[11]) + int(fields[12])


def cpu_ticks_of(pids: Iterable[int]) -> dict[int, int]:
    return {pid: cpu_ticks(pid) for pid in pids}


def ticks_to_us(ticks: float) -> float:
    return ticks * MICROSECONDS_PER_TICK


def parent_pid(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text[text.rindex(")") + 2:].split()[1])


def child_pids(pid: int) -> list[int]:
    """Return the direct children of `pid`, found by scanning the PPid of every process."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and parent_pid(int(entry)) == pid:
            children.append(int(entry))
    return sorted(children)


# --- sockets --------------------------------------------------------------------------------


def _socket_inodes(port: int, state: str) -> set[str]:
    """Return the inodes of TCP sockets in `state` whose local port is `port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == state:
                inodes.add(fields[9])
    return inodes


def _socket_count(pid: int, inodes: set[str]) -> int:
    count = 0
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    for descriptor in descriptors:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{descriptor}")
        except OSError:
            continue  # the descriptor was closed after listdir
        match = re.fullmatch(r"socket:\[(\d+)\]", target)
        if match and match.group(1) in inodes:
            count += 1
    return count


def listens_on(pid: int, port: int) -> bool:
    """Return whether process `pid` has a listening TCP socket on `port`."""
    return _socket_count(pid, _socket_inodes(port, TCP_LISTEN)) > 0


def accepted_connections(pids: Iterable[int], port: int) -> dict[int, int]:
    """Return, per process, the number of its established connections on local `port`."""
    inodes = _socket_inodes(port, TCP_ESTABLISHED)
    return {pid: _socket_count(pid, inodes) for pid in pids}


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    Another process can take it before the caller binds it, so use this only where a
    tool needs a fixed port up front.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- machine and tools ----------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def allowed_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def tool_version(args: Sequence[str]) -> str:
    """Return the first non-empty output line of a version command.

    `wrk -v` prints its version and then exits with status 1, so the status is not checked.
    """
    try:
        completed = subprocess.run(list(args), capture_output=True, text=True, timeout=30,  # noqa: S603
                                   check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    for line in (completed.stdout + "\n" + completed.stderr).splitlines():
        if line.strip():
            return line.strip()
    return "unavailable (no output)"


# --- Checks per worker ----------------------------------------------------------------------

# A text decision log line names the process that decided the Check: "... [PID]: decision_id=...".
DECISION_LINE = re.compile(r" \[(\d+)\]: decision_id=")
# Workers write their decision lines in batches at most 0.2 s apart, so a wait this long
# lets the lines of earlier Checks reach the log.
DECISION_LOG_FLUSH_S = 0.5
SHARE_LOW = 40  # per cent of the Checks that each of two workers should decide
SHARE_HIGH = 60


def decisions_by_pid(log_text: str, pids: Iterable[int]) -> dict[int, int]:
    """Count the decision lines of each process in `log_text`. Each pid in `pids` gets an entry, 0 included."""
    counts = {pid: 0 for pid in pids}
    for pid in DECISION_LINE.findall(log_text):
        counts[int(pid)] = counts.get(int(pid), 0) + 1
    return counts
