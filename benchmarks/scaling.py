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

from benchmarks.context import BenchContext, Section
from benchmarks.loadgen import BenchmarkError, H2loadResult, check_grpc_responses, h2load_command, run_h2load
from benchmarks.measure import Summary, accepted_connections, child_pids, free_port, listens_on, paired_ratios
from benchmarks.report import log_problems, table
from benchmarks.scenario import EncodedCall, PinnedExtauthz, encode_authorization_check

CLIENTS = 8
STREAMS = 4
CALIBRATION_REQUESTS = 2000
MIN_REQUESTS = 1000
SLOWEST_EXPECTED_RATE = 200
START_TIMEOUT_S = 60.0
LISTENING_LINE = re.compile(r"listening on \S+:\d+")

TITLE = "4. Scaling"


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
    results: list[H2loadResult] = field(default_factory=list)
    connections: list[dict[int, int]] = field(default_factory=list)


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

        def measure(server: Server, requests: int, expected_s: float, sample_connections: bool) -> H2loadResult:
            assert server.call is not None
            args = h2load_command(url=f"http://127.0.0.1:{server.port}{server.call.path}",
                                  body_file=server.call.body_file, requests=requests, clients=CLIENTS,
                                  streams=STREAMS, log_file=log_file, cpu_list=ctx.cpus.client)
            ctx.commands.add(args)
            # h2load keeps its connections for the whole run, so a look a third of the way
            # in shows how SO_REUSEPORT spread them over the workers.
            sample: dict[int, int] = {}
            timer = threading.Timer(expected_s / 3, lambda: sample.update(
                accepted_connections(server.worker_pids, server.port)))
            if sample_connections:
                timer.start()
            try:
                result = run_h2load(args, log_file, [server.process.pid, *server.worker_pids], expected_s)
            finally:
                timer.cancel()
            check_grpc_responses(result, server.call.response_frame_bytes, server.label)
            if sample_connections:
                server.connections.append(sample)
            return result

        # The warm-up sizes each server's rounds to about the same duration.
        for server in servers:
            warmup = measure(server, CALIBRATION_REQUESTS, CALIBRATION_REQUESTS / SLOWEST_EXPECTED_RATE, False)
            server.requests = max(MIN_REQUESTS, int(round(warmup.requests_per_s * ctx.profile.scaling_round_s, -2)))
        for _ in range(ctx.profile.rounds):
            for server in servers:
                server.results.append(measure(server, server.requests, ctx.profile.scaling_round_s, True))
    finally:
        for server in servers:
            server.process.stop()
    findings: list[str] = []
    for server in servers:
        findings += log_problems(f"extauthz {server.label}", server.process.log_path)
    return Section(TITLE, _render(ctx, servers), findings)


def _render(ctx: BenchContext, servers: list[Server]) -> str:
    rows = []
    for server in servers:
        results = server.results
        worker_cpu = [sum(r.cpu.us_by_pid[pid] for pid in server.worker_pids) / r.done for r in results]
        supervisor_cpu = [r.cpu.us_by_pid[server.process.pid] / r.done for r in results]
        rows.append([
            server.label,
            f"{server.requests:,}",
            Summary.of([r.requests_per_s for r in results]).format(),
            Summary.of([r.p50_ms for r in results]).format(2),
            Summary.of([r.p99_ms for r in results]).format(2),
            Summary.of(worker_cpu).format(),
            Summary.of(supervisor_cpu).format() if server.workers > 1 else "–",
            Summary.of([r.cpu.client_us / r.done for r in results]).format(),
        ])
    one_both, one_pinned, two_both, two_pinned = servers

    def speedup(numerator: Server, denominator: Server) -> str:
        return paired_ratios([r.requests_per_s for r in numerator.results],
                             [r.requests_per_s for r in denominator.results]).format(2)

    share_rows = []
    for server in (two_both, two_pinned):
        for index, pid in enumerate(server.worker_pids):
            shares = []
            for result in server.results:
                total = sum(result.cpu.us_by_pid[worker] for worker in server.worker_pids)
                shares.append(100 * result.cpu.us_by_pid[pid] / total if total else 0.0)
            connections = ", ".join(str(sample.get(pid, 0)) if sample else "not sampled"
                                    for sample in server.connections)
            share_rows.append([server.label, f"worker {index + 1}", Summary.of(shares).format(0, " %"),
                               connections])
    return "\n".join([
        "Four servers run at once, each on its own fixed port, and the rounds alternate between them. "
        f"h2load (`-c {CLIENTS} -m {STREAMS}`) runs on CPU {ctx.cpus.client}, "
        "which it shares with the servers that may use that CPU, so its own CPU time is in the last column. "
        "Worker CPU counts every worker process; with `--workers 1` the server is a single process without "
        "a supervisor.",
        "",
        table(["server", "Checks per round", "Check/s", "p50 ms", "p99 ms", "worker CPU µs/Check",
               "supervisor CPU µs/Check", "h2load CPU µs/Check"], rows),
        "",
        "Check/s ratios of paired rounds:",
        "",
        f"- `--workers 2` over `--workers 1`, both on CPUs {ctx.cpus.both}: **{speedup(two_both, one_both)}×**",
        f"- `--workers 2` on CPUs {ctx.cpus.both} over `--workers 1` on CPU {ctx.cpus.server}: "
        f"**{speedup(two_both, one_pinned)}×**",
        f"- `--workers 2` with pinned workers over `--workers 1` on CPU {ctx.cpus.server}: "
        f"{speedup(two_pinned, one_pinned)}×",
        f"- `--workers 1` on CPUs {ctx.cpus.both} over `--workers 1` on CPU {ctx.cpus.server}: "
        f"{speedup(one_both, one_pinned)}×",
        "",
        "Share of the Checks per worker, estimated by its share of the workers' CPU time, and the connections "
        f"of the {CLIENTS} h2load clients that each worker had accepted a third of the way into each round:",
        "",
        table(["server", "worker", "CPU share", "connections per round"], share_rows),
    ])
