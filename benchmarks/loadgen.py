"""Run h2load and wrk pinned to CPUs, parse their output, and measure server CPU time during each run.

Every run has a subprocess timeout, so a stuck load generator is killed instead of
hanging the benchmark.
"""

from __future__ import annotations

import re
import resource
import shlex
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.measure import cpu_ticks_of, ticks_to_us


class BenchmarkError(RuntimeError):
    """A run that must not be reported: a tool failed, or the server denied or dropped requests."""


# Seconds a load generator may run beyond its planned duration before it is killed.
TIMEOUT_MARGIN_S = 60.0

_UNIT_US = {"us": 1.0, "ms": 1_000.0, "s": 1_000_000.0, "m": 60_000_000.0}


def pinned(cpu_list: str, args: Sequence[str]) -> list[str]:
    """Prefix `args` with setpriv and taskset, which both exec the command, so its pid stays the same.

    taskset keeps the command and all its threads on `cpu_list`. setpriv sets the parent
    death signal, so the command gets SIGTERM when the benchmark process dies, even by SIGKILL.
    """
    return ["setpriv", "--pdeathsig", "TERM", "taskset", "--cpu-list", cpu_list, *args]


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Return the nearest-rank percentile of already sorted values."""
    if not sorted_values:
        raise ValueError("no values")
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values) + 0.5) - 1))
    return float(sorted_values[index])


@dataclass
class CommandLog:
    """The commands a run executed, for the report, with secrets and temporary paths replaced."""

    replacements: dict[str, str] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    _section_lines: set[str] = field(default_factory=set)

    def start_section(self, title: str) -> None:
        """Add a comment line with `title`. A command repeated within a section is listed once."""
        if self.lines:
            self.lines.append("")
        self.lines.append(f"# {title}")
        self._section_lines.clear()

    def text_of(self, args: Sequence[str]) -> str:
        text = shlex.join(args)
        for secret, placeholder in self.replacements.items():
            text = text.replace(secret, placeholder)
        return text

    def note(self, text: str) -> None:
        self.lines.append(f"# {text}")

    def add_text(self, text: str) -> None:
        """Add a command written by hand, for one whose real arguments change every run."""
        self.lines.append(text)

    def add(self, args: Sequence[str]) -> str:
        text = self.text_of(args)
        if text not in self._section_lines:
            self._section_lines.add(text)
            self.lines.append(text)
        return text


def _run(args: list[str], timeout_s: float) -> str:
    try:
        completed = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s,  # noqa: S603
                                   check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchmarkError(f"{args[0]} did not finish within {timeout_s:.0f} s: {shlex.join(args)}") from exc
    if completed.returncode != 0:
        raise BenchmarkError(f"{shlex.join(args)} exited with code {completed.returncode}\n"
                             f"{completed.stdout}\n{completed.stderr}")
    return completed.stdout


@dataclass(frozen=True)
class CpuDelta:
    """CPU time used during one load run: per server process, and by the load generator."""

    us_by_pid: dict[int, float]
    client_us: float

    @property
    def total_us(self) -> float:
        return sum(self.us_by_pid.values())


def _children_cpu_us() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) * 1_000_000


def _measure_cpu(pids: Iterable[int], run: Callable[[], str]) -> tuple[str, CpuDelta]:
    pid_list = list(pids)
    before = cpu_ticks_of(pid_list)
    # The load generator is the only child that exits during the run, so the growth of
    # RUSAGE_CHILDREN is its CPU time.
    client_before = _children_cpu_us()
    result = run()
    client_after = _children_cpu_us()
    after = cpu_ticks_of(pid_list)
    return result, CpuDelta({pid: ticks_to_us(after[pid] - before[pid]) for pid in pid_list},
                            client_after - client_before)


# --- h2load ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class H2loadResult:
    done: int
    succeeded: int
    failed: int
    errored: int
    timed_out: int
    status_2xx: int
    requests_per_s: float
    data_bytes: int
    p50_ms: float
    p99_ms: float
    cpu: CpuDelta

    def cpu_us_per_request(self, pids: Iterable[int] | None = None) -> float:
        chosen = self.cpu.us_by_pid if pids is None else {pid: self.cpu.us_by_pid[pid] for pid in pids}
        return sum(chosen.values()) / self.done if self.done else 0.0


def h2load_command(*, url: str, body_file: Path, requests: int, clients: int, streams: int,
                   log_file: Path, cpu_list: str) -> list[str]:
    """Build the h2load command for a gRPC POST of a pre-encoded message.

    gRPC needs `content-type: application/grpc` and `te: trailers`. h2load speaks HTTP/2
    without TLS to an http:// URL (prior knowledge), as gRPC clients do.
    """
    return pinned(cpu_list, [
        "h2load", "-n", str(requests), "-c", str(clients), "-m", str(streams),
        "--header", "content-type: application/grpc", "--header", "te: trailers",
        "-d", str(body_file), "--log-file", str(log_file), url,
    ])


def _h2load_int(pattern: str, text: str) -> int:
    match = re.search(pattern, text)
    if match is None:
        raise BenchmarkError(f"h2load output has no match for {pattern!r}:\n{text}")
    return int(match.group(1))


def parse_h2load(output: str, log_file: Path, cpu: CpuDelta) -> H2loadResult:
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", output)
    if rate is None:
        raise BenchmarkError(f"h2load output has no 'finished in' line:\n{output}")
    # h2load logs one line per finished request: start time, HTTP status, microseconds.
    latencies_us = sorted(int(line.split("\t")[2]) for line in log_file.read_text().splitlines() if line)
    if not latencies_us:
        raise BenchmarkError(f"h2load wrote no request to {log_file}:\n{output}")
    return H2loadResult(
        done=_h2load_int(r"requests: \d+ total, \d+ started, (\d+) done", output),
        succeeded=_h2load_int(r"(\d+) succeeded", output),
        failed=_h2load_int(r"(\d+) failed", output),
        errored=_h2load_int(r"(\d+) errored", output),
        timed_out=_h2load_int(r"(\d+) timeout", output),
        status_2xx=_h2load_int(r"status codes: (\d+) 2xx", output),
        requests_per_s=float(rate.group(1)),
        data_bytes=_h2load_int(r"\((\d+)\) data", output),
        p50_ms=percentile(latencies_us, 0.50) / 1000,
        p99_ms=percentile(latencies_us, 0.99) / 1000,
        cpu=cpu,
    )


def run_h2load(args: list[str], log_file: Path, server_pids: Iterable[int], expected_s: float) -> H2loadResult:
    """Run h2load, measure the CPU time of `server_pids` meanwhile, and parse the result."""
    # h2load appends to an existing log file, which would mix this run with earlier ones.
    log_file.unlink(missing_ok=True)
    output, cpu = _measure_cpu(server_pids, lambda: _run(args, expected_s + TIMEOUT_MARGIN_S))
    return parse_h2load(output, log_file, cpu)


def check_grpc_responses(result: H2loadResult, response_frame_bytes: int, description: str) -> None:
    """Fail unless every request got HTTP 200 and a body as long as the expected gRPC response.

    h2load cannot read gRPC trailers, and a failed call (for example RESOURCE_EXHAUSTED)
    also has HTTP status 200, but without a message. `encode_authorization_check` made sure
    that a denial has another length than the allow response. So equal DATA bytes mean
    that every call returned the allow response, unless longer and shorter wrong responses
    cancel out exactly.
    """
    problems = []
    if result.failed or result.errored or result.timed_out:
        problems.append(f"{result.failed} failed, {result.errored} errored, {result.timed_out} timed out")
    if result.status_2xx != result.done:
        problems.append(f"{result.done - result.status_2xx} of {result.done} responses were not HTTP 2xx")
    expected = result.done * response_frame_bytes
    if result.data_bytes != expected:
        problems.append(f"{result.data_bytes} response bytes instead of {expected} "
                        f"({result.done} x {response_frame_bytes}): some Checks were not answered with the "
                        "expected allow response")
    if problems:
        raise BenchmarkError(f"{description}: " + "; ".join(problems))


# --- wrk ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    requests: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int
    cpu: CpuDelta

    def cpu_us_per_request(self, pids: Iterable[int]) -> float:
        return sum(self.cpu.us_by_pid[pid] for pid in pids) / self.requests if self.requests else 0.0


def wrk_command(*, url: str, token: str, connections: int, duration_s: int, cpu_list: str) -> list[str]:
    return pinned(cpu_list, [
        "wrk", "-t", "1", "-c", str(connections), "-d", f"{duration_s}s", "--latency",
        "-H", f"authorization: Bearer {token}", url,
    ])


def _wrk_duration_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise BenchmarkError(f"cannot read wrk latency {text!r}")
    return float(match.group(1)) * _UNIT_US[match.group(2)] / 1000


def parse_wrk(output: str, cpu: CpuDelta) -> WrkResult:
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", output, re.MULTILINE))
    requests = re.search(r"^\s+(\d+) requests in", output, re.MULTILINE)
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    if requests is None or rate is None or set(percentiles) != {"50", "99"}:
        raise BenchmarkError(f"cannot read the wrk output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return WrkResult(
        requests=int(requests.group(1)),
        requests_per_s=float(rate.group(1)),
        p50_ms=_wrk_duration_ms(percentiles["50"]),
        p99_ms=_wrk_duration_ms(percentiles["99"]),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in socket_errors.groups()) if socket_errors else 0,
        cpu=cpu,
    )


def run_wrk(args: list[str], server_pids: Iterable[int], duration_s: float, description: str) -> WrkResult:
    """Run wrk and fail unless every response was 2xx and no socket error happened."""
    output, cpu = _measure_cpu(server_pids, lambda: _run(args, duration_s + TIMEOUT_MARGIN_S))
    result = parse_wrk(output, cpu)
    if result.non_2xx or result.socket_errors:
        raise BenchmarkError(f"{description}: {result.non_2xx} responses were not 2xx and "
                             f"{result.socket_errors} socket errors happened in {result.requests} requests:\n{output}")
    return result
