"""Section 1: h2load sends pre-encoded Checks straight to one extauthz process."""

from __future__ import annotations

from dataclasses import dataclass, field

from benchmarks.context import BenchContext, Section
from benchmarks.loadgen import H2loadResult, check_grpc_responses, h2load_command, run_h2load
from benchmarks.measure import Summary, free_port, paired_differences, paired_ratios
from benchmarks.report import log_problems, table
from benchmarks.scenario import (
    AUTHORIZATION_CHECK_PATH,
    EncodedCall,
    PinnedExtauthz,
    QuietPinnedExtauthz,
    encode_authorization_check,
    encode_health_check,
)

# Requests of the calibration run that sizes each round to the profile's round length.
CALIBRATION_REQUESTS = 2000
MIN_REQUESTS = 1000
# Lower bound of the request rate used for the h2load timeout.
SLOWEST_EXPECTED_RATE = 200

TITLE = "1. Direct Check load"


@dataclass
class LoadShape:
    """One server and h2load configuration, and the results of its rounds."""

    label: str
    server: PinnedExtauthz
    call: EncodedCall
    clients: int
    streams: int
    requests: int = 0
    results: list[H2loadResult] = field(default_factory=list)

    @property
    def shape(self) -> str:
        return f"-c {self.clients} -m {self.streams}"


def run(ctx: BenchContext) -> Section:
    # `quiet` differs only in --log-level WARNING, which turns off the log line per decision.
    server = PinnedExtauthz(ctx.cpus.server, ctx.scenario.policies_dir, *ctx.single_process_flags(),
                            work_dir=ctx.work_dir / "direct-extauthz")
    quiet = QuietPinnedExtauthz(ctx.cpus.server, ctx.scenario.policies_dir, *ctx.single_process_flags(),
                                port=free_port(), work_dir=ctx.work_dir / "direct-extauthz-quiet")
    try:
        for process in (server, quiet):
            process.start()
            process.wait_serving(service="envoy.service.auth.v3.Authorization")
            ctx.commands.add(process.args)
        check = encode_authorization_check(ctx.scenario, server.address, ctx.work_dir)
        quiet_check = encode_authorization_check(ctx.scenario, quiet.address, ctx.work_dir)
        health = encode_health_check(ctx.work_dir)
        shapes = [
            LoadShape("Authorization/Check, saturating", server, check, clients=4, streams=4),
            LoadShape("Health/Check, saturating (gRPC floor)", server, health, clients=4, streams=4),
            LoadShape("Authorization/Check, 1 in flight", server, check, clients=1, streams=1),
            LoadShape("Authorization/Check, saturating, `--log-level WARNING`", quiet, quiet_check,
                      clients=4, streams=4),
        ]
        log_file = ctx.work_dir / "h2load-direct.log"

        def measure(shape: LoadShape, requests: int) -> H2loadResult:
            args = h2load_command(url=f"http://{shape.server.address}{shape.call.path}",
                                  body_file=shape.call.body_file, requests=requests, clients=shape.clients,
                                  streams=shape.streams, log_file=log_file, cpu_list=ctx.cpus.client)
            ctx.commands.add(args)
            result = run_h2load(args, log_file, [shape.server.pid], expected_s=requests / SLOWEST_EXPECTED_RATE)
            check_grpc_responses(result, shape.call.response_frame_bytes, f"direct {shape.label}")
            return result

        for shape in shapes:
            warmup = measure(shape, CALIBRATION_REQUESTS)
            shape.requests = max(MIN_REQUESTS, int(round(warmup.requests_per_s * ctx.profile.direct_round_s, -2)))
        for _ in range(ctx.profile.rounds):
            for shape in shapes:
                shape.results.append(measure(shape, shape.requests))
    finally:
        quiet.stop()
        server.stop()
    findings = log_problems("extauthz (direct)", server.log_path)
    findings += log_problems("extauthz (direct, --log-level WARNING)", quiet.log_path)
    return Section(TITLE, _render(ctx, shapes), findings)


def _render(ctx: BenchContext, shapes: list[LoadShape]) -> str:
    rows = []
    for shape in shapes:
        rows.append([
            shape.label, f"`{shape.shape}`", f"{shape.requests:,}",
            Summary.of([r.requests_per_s for r in shape.results]).format(),
            Summary.of([r.p50_ms for r in shape.results]).format(2),
            Summary.of([r.p99_ms for r in shape.results]).format(2),
            Summary.of([r.cpu_us_per_request() for r in shape.results]).format(),
            Summary.of([r.cpu.client_us / r.done for r in shape.results]).format(),
        ])
    saturating, floor, _, quiet = shapes

    def cpu(shape: LoadShape) -> list[float]:
        return [r.cpu_us_per_request() for r in shape.results]

    def rate(shape: LoadShape) -> list[float]:
        return [r.requests_per_s for r in shape.results]

    return "\n".join([
        f"One `extauthz serve` process on CPU {ctx.cpus.server} serves the scenario's policies with its default "
        f"flags. h2load runs on CPU {ctx.cpus.client} and POSTs the pre-encoded `CheckRequest` to "
        f"`{AUTHORIZATION_CHECK_PATH}`. `grpc.health.v1.Health/Check` on the same server is the floor: the cost "
        "of a gRPC call in this server without policy work. A second server, also on CPU "
        f"{ctx.cpus.server} and idle while the first is loaded, runs with `--log-level WARNING`, which turns off "
        "the INFO log line that extauthz writes per decision.",
        "",
        "Every round checks that each response is exactly as long as the allow response that grpcio received "
        "before the load. A denial or a failed call has another length, so it fails the run instead of being "
        "counted.",
        "",
        table(["load", "h2load", "calls per round", "calls/s", "p50 ms", "p99 ms", "server CPU µs/call",
               "h2load CPU µs/call"], rows),
        "",
        f"- Server CPU of a Check over a Health/Check (saturating, paired rounds): "
        f"**{paired_ratios(cpu(saturating), cpu(floor)).format(2)}×**, that is "
        f"**{paired_differences(cpu(saturating), cpu(floor)).format()} µs** more per call. That is the cost of "
        "reading the request, the token (verified once, then served from the verified-token cache), the "
        "policies, the response, the metrics and the decision log line.",
        f"- Check/s over Health/Check/s: {paired_ratios(rate(saturating), rate(floor)).format(2)}.",
        f"- The decision log line costs {paired_differences(cpu(saturating), cpu(quiet)).format()} µs of server CPU "
        "per Check; Check/s at INFO over Check/s at WARNING: "
        f"{paired_ratios(rate(saturating), rate(quiet)).format(2)}.",
        "- Latencies come from h2load's per-request log: from sending the request to the end of the response.",
    ])
