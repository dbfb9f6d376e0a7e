"""Part of section 4: how Envoy's Checks spread over two workers, without and with `--max-connection-age`.

One Envoy worker keeps one HTTP/2 connection to extauthz, and SO_REUSEPORT gives that
connection to one worker for its whole life. With `--max-connection-age`, extauthz sends
Envoy an HTTP/2 GOAWAY after that age, Envoy reconnects, and each new connection is hashed
to a worker again, so the Checks spread over both workers in time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from benchmarks.context import BenchContext
from benchmarks.loadgen import BenchmarkError, WrkResult, run_wrk, wrk_command
from benchmarks.measure import (
    DECISION_LOG_FLUSH_S,
    SHARE_HIGH,
    SHARE_LOW,
    Summary,
    child_pids,
    decisions_by_pid,
    free_port,
    listens_on,
)
from benchmarks.report import log_problems, table
from benchmarks.scenario import PATH, PinnedEnvoy, PinnedExtauthz
from benchmarks.through_envoy import envoy_bootstrap

CONNECTION_AGE_S = 0.1
WRK_CONNECTIONS = 8
START_TIMEOUT_S = 60.0
DECISION_LOG_WAIT_S = 5.0


@dataclass
class Setup:
    """One `extauthz serve --workers 2` with its own Envoy, and the Checks per worker of each round."""

    label: str
    age_s: float
    extauthz: PinnedExtauthz
    envoy: PinnedEnvoy | None = None
    worker_pids: list[int] = field(default_factory=list)
    url: str = ""
    results: list[WrkResult] = field(default_factory=list)
    checks: list[dict[int, int]] = field(default_factory=list)


def _worker_pids(setup: Setup, port: int) -> list[int]:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        pids = [pid for pid in child_pids(setup.extauthz.pid) if listens_on(pid, port)]
        if len(pids) == 2:
            return pids
        time.sleep(0.1)
    raise BenchmarkError(f"{setup.label}: 2 listening workers expected within {START_TIMEOUT_S:.0f} s:\n"
                         f"{setup.extauthz.log_text()}")


def _count_checks(setup: Setup, log_offset: int) -> dict[int, int]:
    """Count the decision lines per worker after `log_offset`, once they stop growing."""
    last = -1
    deadline = time.monotonic() + DECISION_LOG_WAIT_S
    while True:
        counts = decisions_by_pid(setup.extauthz.log_text()[log_offset:], setup.worker_pids)
        total = sum(counts.values())
        if total == last or time.monotonic() > deadline:
            return counts
        last = total
        time.sleep(DECISION_LOG_FLUSH_S)


def run(ctx: BenchContext) -> tuple[str, list[str]]:
    """Return the markdown of this part and the log findings."""
    setups = [
        Setup("`--max-connection-age 0` (off)", 0.0,
              PinnedExtauthz(ctx.cpus.both, ctx.scenario.policies_dir, "--workers", "2", "--max-connection-age", "0",
                             listen=f"127.0.0.1:{free_port()}", work_dir=ctx.work_dir / "balance-off")),
        Setup(f"`--max-connection-age {CONNECTION_AGE_S}`", CONNECTION_AGE_S,
              PinnedExtauthz(ctx.cpus.both, ctx.scenario.policies_dir, "--workers", "2", "--max-connection-age",
                             str(CONNECTION_AGE_S), listen=f"127.0.0.1:{free_port()}",
                             work_dir=ctx.work_dir / "balance-age")),
    ]
    try:
        for setup in setups:
            setup.extauthz.start(timeout=START_TIMEOUT_S)
            setup.extauthz.wait_serving(service="envoy.service.auth.v3.Authorization", timeout=START_TIMEOUT_S)
            setup.worker_pids = _worker_pids(setup, setup.extauthz.port)
            ctx.commands.add(setup.extauthz.args)
            bootstrap = envoy_bootstrap(setup.extauthz.port, ctx.scenario.jwks_server.port, ctx.scenario.jwks_url)
            setup.envoy = PinnedEnvoy(ctx.cpus.server, bootstrap, work_dir=setup.extauthz.work_dir / "envoy",
                                      listener_name="ext_authz")
            setup.envoy.start()
            ctx.commands.add(setup.envoy.args)
            setup.url = f"http://127.0.0.1:{setup.envoy.listener_ports()['ext_authz']}{PATH}"
        duration_s = max(2, round(ctx.profile.scaling_round_s))
        for _ in range(ctx.profile.rounds):
            for setup in setups:
                assert setup.envoy is not None
                args = wrk_command(url=setup.url, token=ctx.scenario.token, connections=WRK_CONNECTIONS,
                                   duration_s=duration_s, cpu_list=ctx.cpus.client)
                ctx.commands.add(args)
                time.sleep(DECISION_LOG_FLUSH_S)  # lines of earlier Checks reach the log first
                offset = len(setup.extauthz.log_text())
                pids = [setup.envoy.pid, setup.extauthz.pid, *setup.worker_pids]
                setup.results.append(run_wrk(args, pids, duration_s, f"Envoy in front of {setup.label}"))
                setup.checks.append(_count_checks(setup, offset))
    finally:
        for setup in setups:
            if setup.envoy is not None:
                setup.envoy.stop()
            setup.extauthz.stop()
    findings: list[str] = []
    for setup in setups:
        findings += log_problems(f"extauthz {setup.label} behind Envoy", setup.extauthz.log_path)
    return _render(ctx, setups), findings


def _render(ctx: BenchContext, setups: list[Setup]) -> str:
    rows = []
    for setup in setups:
        for index, pid in enumerate(setup.worker_pids):
            shares = [100 * checks[pid] / max(1, sum(checks.values())) for checks in setup.checks]
            within = sum(1 for share in shares if SHARE_LOW <= share <= SHARE_HIGH)
            rows.append([setup.label, f"worker {index + 1}", Summary.of(shares).format(0, " %"),
                         ", ".join(f"{share:.0f}" for share in shares), f"{within} of {len(shares)}",
                         Summary.of([result.requests_per_s for result in setup.results]).format()])
    return "\n".join([
        "### Checks from Envoy over two workers",
        "",
        "An Envoy (`--concurrency 1`) with the ext_authz listener of section 2 runs on CPU "
        f"{ctx.cpus.server} in front of each of two `extauthz serve --workers 2` on CPUs {ctx.cpus.both}; wrk "
        f"(`-c {WRK_CONNECTIONS}`) on CPU {ctx.cpus.client}. One Envoy worker sends its Checks over one HTTP/2 "
        "connection, so without a connection age one extauthz worker decides all of them. With "
        f"`--max-connection-age {CONNECTION_AGE_S}`, extauthz sends HTTP/2 GOAWAY after "
        f"{CONNECTION_AGE_S} s, Envoy opens a new connection, and SO_REUSEPORT hashes it to a worker again. "
        "Every response was 2xx, so no Check failed on a recycled connection. The share is counted from the "
        "decision log lines.",
        "",
        table(["server behind Envoy", "worker", "Check share", "Check share per round (%)",
               f"rounds in {SHARE_LOW}–{SHARE_HIGH} %", "req/s through Envoy"], rows),
    ])
