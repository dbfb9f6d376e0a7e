"""Section 4: `extauthz serve --workers 1` against `--workers 2` on fixed ports, loaded directly by h2load.

All servers run at the same time, each on its own port, and the rounds alternate between
them, so all see the same phases of a noisy machine. A server that gets no load uses
almost no CPU.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field

from benchmarks import worker_balance
from benchmarks.context import BenchContext, Section
from benchmarks.loadgen import BenchmarkError, H2loadResult, check_grpc_responses, h2load_command, run_h2load
from benchmarks.measure import (
    DECISION_LOG_FLUSH_S,
    SHARE_HIGH,
    SHARE_LOW,
    Summary,
    accepted_connections,
    child_pids,
    decisions_by_pid,
    free_port,
    listens_on,
    paired_ratios,
)
from benchmarks.report import log_problems, table
from benchmarks.scenario import EncodedCall, PinnedExtauthz, encode_authorization_check

CLIENTS = 8
STREAMS = 4
# A second load on the two-worker servers: as many Checks in flight, spread over more
# connections, as when many Envoy workers or sidecars call one extauthz.
MANY_CLIENTS = 32
MANY_STREAMS = 1
CALIBRATION_REQUESTS = 2000
MIN_REQUESTS = 1000
SLOWEST_EXPECTED_RATE = 200
START_TIMEOUT_S = 60.0
LISTENING_LINE = re.compile(r"listening on \S+:\d+")
DECISION_LOG_WAIT_S = 5.0
CONNECTION_SAMPLE_S = 0.5

TITLE = "4. Scaling"


@dataclass(frozen=True)
class Shape:
    """An h2load load: connections and concurrent streams per connection."""

    clients: int
    streams: int

    @property
    def flags(self) -> str:
        return f"-c {self.clients} -m {self.streams}"


FEW_CONNECTIONS = Shape(CLIENTS, STREAMS)
MANY_CONNECTIONS = Shape(MANY_CLIENTS, MANY_STREAMS)


@dataclass
class Round:
    """One h2load round: its result, the Checks each worker decided, and the connections it had."""

    result: H2loadResult
    checks: dict[int, int]
    connections: dict[int, int]


@dataclass
class Server:
    """One `extauthz serve` under test. With `pin_workers`, it runs with `--pin-workers`."""

    label: str
    workers: int
    cpu_list: str
    pin_workers: bool
    process: PinnedExtauthz
    port: int
    requests: int = 0  # Checks per round
    call: EncodedCall | None = None
    worker_pids: list[int] = field(default_factory=list)
    rounds: dict[Shape, list[Round]] = field(default_factory=dict)

    @property
    def results(self) -> list[H2loadResult]:
        return [measured.result for measured in self.rounds.get(FEW_CONNECTIONS, [])]


def _checks_by_worker(server: Server, log_offset: int, expected: int) -> dict[int, int]:
    """Count the decision lines per worker written after `log_offset`, waiting for all `expected`."""
    deadline = time.monotonic() + DECISION_LOG_WAIT_S
    while True:
        counts = decisions_by_pid(server.process.log_text()[log_offset:], server.worker_pids)
        total = sum(counts.values())
        if total >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if total != expected:
        raise BenchmarkError(f"{server.label}: {total} decision lines for {expected} Checks, so the Checks "
                             "per worker cannot be counted")
    return counts


def _wait_for_workers(server: Server) -> None:
    """Wait until every worker logged `listening on` and has a listening socket on the port."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not server.process.is_running():
            raise BenchmarkError(f"extauthz --workers {server.workers} exited:\n{server.process.log_text()}")
        listening = len(LISTENING_LINE.findall(server.process.log_text()))
        if server.workers == 1:
            candidates = [server.process.pid]
        else:
            candidates = child_pids(server.process.pid)
        worker_pids = [pid for pid in candidates if listens_on(pid, server.port)]
        if listening >= server.workers and len(worker_pids) == server.workers:
            server.worker_pids = worker_pids
            return
        time.sleep(0.1)
    raise BenchmarkError(f"extauthz --workers {server.workers} did not have {server.workers} listening workers "
                         f"within {START_TIMEOUT_S:.0f} s:\n{server.process.log_text()}")


def _configurations(ctx: BenchContext) -> list[tuple[str, int, str, bool]]:
    """Return (label, workers, CPU list, pin each worker) of the servers to compare.

    `--workers 1` on one CPU is the reference, because one process is limited by the GIL
    and section 1 runs it that way. `--pin-workers` pins worker i to the i-th allowed CPU,
    which shows how much the kernel's scheduling of unpinned workers costs.
    """
    both, server = ctx.cpus.both, ctx.cpus.server
    return [
        (f"`--workers 1`, CPUs {both}", 1, both, False),
        (f"`--workers 1`, CPU {server}", 1, server, False),
        (f"`--workers 2`, CPUs {both}", 2, both, False),
        (f"`--workers 2 --pin-workers`, CPUs {both}", 2, both, True),
    ]


def run(ctx: BenchContext) -> Section:
    if not ctx.serve_has_flag("--workers"):
        return Section(TITLE, "Not measured: `extauthz serve --help` of this checkout has no `--workers` flag.",
                       ["section 4 skipped: `extauthz serve` has no --workers flag"])
    servers: list[Server] = []
    try:
        for index, (label, workers, cpu_list, pin_workers) in enumerate(_configurations(ctx)):
            port = free_port()
            pin_flag = ["--pin-workers"] if pin_workers else []
            process = PinnedExtauthz(cpu_list, ctx.scenario.policies_dir, "--workers", str(workers), *pin_flag,
                                     listen=f"127.0.0.1:{port}", work_dir=ctx.work_dir / f"scaling-{index}")
            servers.append(Server(label, workers, cpu_list, pin_workers, process, port))
            process.start(timeout=START_TIMEOUT_S)
            process.wait_serving(service="envoy.service.auth.v3.Authorization", timeout=START_TIMEOUT_S)
            _wait_for_workers(servers[-1])
            ctx.commands.add(process.args)
        for server in servers:
            server.call = encode_authorization_check(ctx.scenario, server.process.address, ctx.work_dir)
        log_file = ctx.work_dir / "h2load-scaling.log"

        def measure(server: Server, requests: int, expected_s: float, shape: Shape) -> Round:
            assert server.call is not None
            args = h2load_command(url=f"http://127.0.0.1:{server.port}{server.call.path}",
                                  body_file=server.call.body_file, requests=requests, clients=shape.clients,
                                  streams=shape.streams, log_file=log_file, cpu_list=ctx.cpus.client)
            ctx.commands.add(args)
            # An h2load client closes its connection once it sent its share of the requests,
            # so the connections are sampled early, before the first client is done.
            sample: dict[int, int] = {}
            timer = threading.Timer(min(CONNECTION_SAMPLE_S, expected_s / 3), lambda: sample.update(
                accepted_connections(server.worker_pids, server.port)))
            time.sleep(DECISION_LOG_FLUSH_S)  # lines of earlier Checks reach the log first
            log_offset = len(server.process.log_text())
            timer.start()
            try:
                result = run_h2load(args, log_file, [server.process.pid, *server.worker_pids], expected_s)
            finally:
                timer.cancel()
            check_grpc_responses(result, server.call.response_frame_bytes, server.label)
            return Round(result, _checks_by_worker(server, log_offset, result.done), sample)

        # The warm-up sizes each server's rounds to about the same duration.
        for server in servers:
            warmup = measure(server, CALIBRATION_REQUESTS, CALIBRATION_REQUESTS / SLOWEST_EXPECTED_RATE,
                             FEW_CONNECTIONS)
            server.requests = max(MIN_REQUESTS, int(round(warmup.result.requests_per_s * ctx.profile.scaling_round_s,
                                                          -2)))
        loads = [(server, FEW_CONNECTIONS) for server in servers]
        loads += [(server, MANY_CONNECTIONS) for server in servers if server.workers > 1]
        for _ in range(ctx.profile.rounds):
            for server, shape in loads:
                measured = measure(server, server.requests, ctx.profile.scaling_round_s, shape)
                server.rounds.setdefault(shape, []).append(measured)
    finally:
        for server in servers:
            server.process.stop()
    findings: list[str] = []
    for server in servers:
        findings += log_problems(f"extauthz {server.label}", server.process.log_path)
    balance_text, balance_findings = worker_balance.run(ctx)
    return Section(TITLE, _render(ctx, servers) + "\n\n" + balance_text, findings + balance_findings)


def _throughput_row(server: Server, shape: Shape) -> list[str]:
    results = [measured.result for measured in server.rounds[shape]]
    worker_cpu = [sum(r.cpu.us_by_pid[pid] for pid in server.worker_pids) / r.done for r in results]
    supervisor_cpu = [r.cpu.us_by_pid[server.process.pid] / r.done for r in results]
    return [
        server.label,
        f"`{shape.flags}`",
        f"{server.requests:,}",
        Summary.of([r.requests_per_s for r in results]).format(),
        Summary.of([r.p50_ms for r in results]).format(2),
        Summary.of([r.p99_ms for r in results]).format(2),
        Summary.of(worker_cpu).format(),
        Summary.of(supervisor_cpu).format() if server.workers > 1 else "–",
        Summary.of([r.cpu.client_us / r.done for r in results]).format(),
    ]


def _share_rows(server: Server, shape: Shape) -> list[list[str]]:
    rows = []
    rounds = server.rounds[shape]
    for index, pid in enumerate(server.worker_pids):
        check_shares = [100 * measured.checks[pid] / sum(measured.checks.values()) for measured in rounds]
        cpu_shares = []
        for measured in rounds:
            total = sum(measured.result.cpu.us_by_pid[worker] for worker in server.worker_pids)
            cpu_shares.append(100 * measured.result.cpu.us_by_pid[pid] / total if total else 0.0)
        within = sum(1 for share in check_shares if SHARE_LOW <= share <= SHARE_HIGH)
        rows.append([
            server.label, f"`{shape.flags}`", f"worker {index + 1}",
            Summary.of(check_shares).format(0, " %"),
            ", ".join(f"{share:.0f}" for share in check_shares),
            f"{within} of {len(rounds)}",
            Summary.of(cpu_shares).format(0, " %"),
            ", ".join(str(measured.connections.get(pid, 0)) if measured.connections else "not sampled"
                      for measured in rounds),
        ])
    return rows


def _render(ctx: BenchContext, servers: list[Server]) -> str:
    one_both, one_pinned, two_both, two_pinned = servers
    rows = [_throughput_row(server, FEW_CONNECTIONS) for server in servers]
    rows += [_throughput_row(server, MANY_CONNECTIONS) for server in (two_both, two_pinned)]

    def speedup(numerator: Server, denominator: Server, shape: Shape = FEW_CONNECTIONS) -> str:
        return paired_ratios([measured.result.requests_per_s for measured in numerator.rounds[shape]],
                             [measured.result.requests_per_s for measured in denominator.rounds[FEW_CONNECTIONS]]
                             ).format(2)

    share_rows = []
    for shape in (FEW_CONNECTIONS, MANY_CONNECTIONS):
        for server in (two_both, two_pinned):
            share_rows += _share_rows(server, shape)
    return "\n".join([
        "Four servers run at once, each on its own fixed port, and the rounds alternate between them. "
        f"h2load runs on CPU {ctx.cpus.client}, which it shares with the servers that may use that CPU, so its "
        "own CPU time is in the last column. Every server gets "
        f"`{FEW_CONNECTIONS.flags}` ({FEW_CONNECTIONS.clients} connections); the two-worker servers also get "
        f"`{MANY_CONNECTIONS.flags}`, as many Checks in flight over {MANY_CONNECTIONS.clients} connections, as "
        "when many Envoy workers or sidecars call one extauthz. Worker CPU counts every worker process; with "
        "`--workers 1` the server is a single process without a supervisor.",
        "",
        table(["server", "h2load", "Checks per round", "Check/s", "p50 ms", "p99 ms", "worker CPU µs/Check",
               "supervisor CPU µs/Check", "h2load CPU µs/Check"], rows),
        "",
        "Check/s ratios of paired rounds:",
        "",
        f"- `--workers 2` over `--workers 1`, both on CPUs {ctx.cpus.both}: **{speedup(two_both, one_both)}×**",
        f"- `--workers 2` on CPUs {ctx.cpus.both} over `--workers 1` on CPU {ctx.cpus.server}: "
        f"**{speedup(two_both, one_pinned)}×**",
        f"- `--workers 2` with pinned workers over `--workers 1` on CPU {ctx.cpus.server}: "
        f"{speedup(two_pinned, one_pinned)}×",
        f"- `--workers 2` on CPUs {ctx.cpus.both} with `{MANY_CONNECTIONS.flags}` over `--workers 1` on CPU "
        f"{ctx.cpus.server} with `{FEW_CONNECTIONS.flags}`: {speedup(two_both, one_pinned, MANY_CONNECTIONS)}×",
        f"- `--workers 1` on CPUs {ctx.cpus.both} over `--workers 1` on CPU {ctx.cpus.server}: "
        f"{speedup(one_both, one_pinned)}×",
        "",
        "Share of the Checks per worker, counted from the decision log lines, which name the process (every "
        f"round checks that there is one line per Check). \"rounds in {SHARE_LOW}–{SHARE_HIGH} %\" counts the "
        "rounds in which that worker decided between "
        f"{SHARE_LOW} % and {SHARE_HIGH} % of the Checks. The CPU share is each worker's part of the workers' "
        "CPU time, and the connections are those of h2load's clients that each worker had accepted "
        f"{CONNECTION_SAMPLE_S} s into each round. SO_REUSEPORT gives each new connection to a worker by a hash "
        "of its addresses and ports. h2load sends the same number of requests over each of its connections, "
        "so a worker's share of the Checks is its share of the connections:",
        "",
        table(["server", "h2load", "worker", "Check share", "Check share per round (%)",
               f"rounds in {SHARE_LOW}–{SHARE_HIGH} %", "CPU share", "connections per round"], share_rows),
    ])
