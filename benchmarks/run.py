"""Run the extauthz benchmarks and write docs/performance.md.

    python -m benchmarks.run [--quick] [--sections 1,2,3,4,5] [--output PATH]

Every server listens on 127.0.0.1 only, and every process started here is stopped at the
end of its section, also when the section fails. Temporary files go to a work directory
inside the checkout that is removed at the end. A denial or error under load fails the
run with exit status 1, and the report is then not written.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

if __package__ in (None, ""):
    # Started as `python benchmarks/run.py`: make `benchmarks`, `tests` and `extauthz` importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cryptography
import google.protobuf
import grpc
import jwt

from benchmarks import direct, engine_alone, reload, scaling, through_envoy
from benchmarks.context import DEFAULT_PROFILE, QUICK_PROFILE, BenchContext, CpuSplit, Profile, Section
from benchmarks.loadgen import BenchmarkError, CommandLog
from benchmarks.measure import allowed_cpus, cpu_model, load_average, tool_version
from benchmarks.report import table
from benchmarks.scenario import HOST, METHOD, PATH, policy_yaml, serve_flags, start_scenario
from extauthz.config import GRPC_EXPERIMENTS
from tests.support.processes import REPO_ROOT, find_tool

SECTIONS: dict[str, ModuleType] = {"1": direct, "2": through_envoy, "3": engine_alone, "4": scaling,
                                   "5": reload}
REQUIRED_TOOLS = {"h2load": "nghttp2-client", "wrk": "wrk", "taskset": "util-linux", "setpriv": "util-linux"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 short rounds per measurement, about 4 minutes "
                        "in total instead of about 11")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="comma-separated sections to run (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "docs" / "performance.md",
                        help="Markdown report to write (default: docs/performance.md)")
    return parser.parse_args(argv)


def check_tools() -> dict[str, str]:
    """Return the path of each external tool; exit with a message naming the missing Debian packages."""
    missing = sorted({package for tool, package in REQUIRED_TOOLS.items() if shutil.which(tool) is None})
    if missing:
        sys.exit(f"benchmarks: missing tools; install the Debian packages {' '.join(missing)} "
                 "(make bench installs them when it runs as root)")
    return {"envoy": find_tool("envoy")}


def extauthz_revision() -> str:
    def git(*args: str) -> str:
        completed = subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO_ROOT,  # noqa: S603 S607
                                   timeout=30, check=False)
        return completed.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--", "extauthz")
    return f"{commit} with uncommitted changes in extauthz/" if changed else commit


def _grpc_experiments() -> str:
    value = os.environ.get("GRPC_EXPERIMENTS")
    if value is None:
        return f"`{GRPC_EXPERIMENTS}` (set by `serve`, the benchmark's environment has none)"
    return f"`{value}` (from the benchmark's environment)" if value else "empty: grpc's defaults"


def machine_section(envoy_path: str, cpus: CpuSplit, usable_cpus: list[int], load_before: str) -> str:
    envoy_version = tool_version([envoy_path, "--version"]).removeprefix(envoy_path).strip()
    rows = [
        ["CPU", f"{cpu_model()}, {os.cpu_count()} CPUs, this run may use {','.join(map(str, usable_cpus))}"],
        ["kernel", platform.release()],
        ["extauthz", extauthz_revision()],
        ["Python", platform.python_version()],
        ["grpcio", grpc.__version__],
        ["`GRPC_EXPERIMENTS` of `extauthz serve`", _grpc_experiments()],
        ["protobuf", google.protobuf.__version__],
        ["cryptography / PyJWT", f"{cryptography.__version__} / {jwt.__version__}"],
        ["Envoy (`envoy --version`)", envoy_version],
        ["h2load (`h2load --version`)", tool_version(["h2load", "--version"])],
        ["wrk (`wrk -v`)", tool_version(["wrk", "-v"])],
        ["load average before the run (1, 5, 15 min)", load_before],
        ["load average after the run", load_average()],
    ]
    split = [
        f"- Servers (extauthz, Envoy): CPU {cpus.server}. Section 4 allows the servers CPUs {cpus.both} and "
        "pins some of them to one CPU, as its table says.",
        f"- Load generators (h2load, wrk) and the benchmark process itself, which runs section 3 and the "
        f"JWKS server: CPU {cpus.client}.",
    ]
    if not cpus.separate:
        split.append("- Only one CPU was available, so servers and load generators competed for it: the "
                     "absolute numbers are lower than on a machine with two CPUs.")
    return "\n".join([table(["", ""], rows), "", "CPU split, set with `taskset --cpu-list`:", "", *split])


def scenario_section() -> str:
    return "\n".join([
        "Workload `bench`/`app=api`. The RequestAuthentication fetches its keys from a JWKS server in the "
        "benchmark process (one RS256 2048-bit key). Every request is "
        f"`{METHOD} {PATH}` to host `{HOST}` with `authorization: Bearer $TOKEN`, where `$TOKEN` is an RS256 "
        "token of that issuer with audience `api.bench` and `groups: [bench-readers, staff]`, signed at the "
        "start of the run. Every measured request is allowed.",
        "",
        "```yaml",
        policy_yaml("jwksUri: http://127.0.0.1:$JWKS_PORT/jwks.json").rstrip(),
        "```",
    ])


def render(profile: Profile, started: datetime.datetime, elapsed_s: float, machine: str,
           sections: list[Section], commands: CommandLog) -> str:
    findings = [finding for section in sections for finding in section.findings]
    command = " ".join(["python -m benchmarks.run", *sys.argv[1:]])  # what `make bench` runs, with its arguments
    parts = [
        "# Performance",
        "",
        f"Written by `{command}` (`benchmarks/run.py`, profile `{profile.name}`) on "
        f"{started:%Y-%m-%d %H:%M} UTC in {elapsed_s / 60:.1f} minutes. Do not edit it by hand: run the "
        "benchmark again. `benchmarks/README.md` describes the sections.",
        "",
        f"Every number is the median and, in brackets, the range (min–max) of {profile.rounds} rounds measured "
        "in this one run. Within a section the rounds alternate between the variants, and ratios are the "
        "median of per-round ratios, so a slow phase of this shared machine hits all variants alike. "
        "Absolute numbers hold only for this machine and this load; compare ratios.",
        "",
        "## Machine and tools",
        "",
        machine,
        "",
        "## Scenario",
        "",
        scenario_section(),
    ]
    for section in sections:
        parts += ["", f"## {section.title}", "", section.markdown]
    parts += ["", "## Errors and warnings in the logs", ""]
    parts += [f"- {finding}" for finding in findings] or ["None: no server logged an error or a warning."]
    parts += ["", "## Commands", "",
              "`$WORK` is the temporary work directory, `$TOKEN` the token above, and ports are picked free "
              "at run time. The first h2load command of each load is the calibration run that sizes its "
              "rounds.", "", "```sh", *commands.lines, "```", ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profile = QUICK_PROFILE if args.quick else DEFAULT_PROFILE
    chosen = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        sys.exit(f"benchmarks: unknown section {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    tools = check_tools()
    usable_cpus = allowed_cpus()
    cpus = CpuSplit.of(usable_cpus)
    started = datetime.datetime.now(datetime.UTC)
    load_before = load_average()
    clock_start = time.monotonic()

    work_dir = Path(tempfile.mkdtemp(prefix=".work-", dir=REPO_ROOT / "benchmarks"))
    # Child processes and tempfile users write their temporary files here, not in /tmp.
    os.environ["TMPDIR"] = str(work_dir)
    tempfile.tempdir = str(work_dir)
    # The benchmark process shares the load generators' CPU. Its children are pinned by taskset.
    os.sched_setaffinity(0, {int(cpus.client)})
    scenario = None
    try:
        scenario = start_scenario(work_dir)
        # The work directory is inside the checkout, so it is replaced before the checkout path.
        commands = CommandLog({scenario.token: "$TOKEN", str(work_dir): "$WORK", f"{REPO_ROOT}/": ""})
        ctx = BenchContext(profile, cpus, work_dir, scenario, commands, serve_flags())
        sections = []
        for name in chosen:
            section_start = time.monotonic()
            print(f"benchmarks: section {name} ...", file=sys.stderr, flush=True)
            module = SECTIONS[name]
            commands.start_section(module.TITLE)
            sections.append(module.run(ctx))
            print(f"benchmarks: section {name} took {time.monotonic() - section_start:.0f} s", file=sys.stderr,
                  flush=True)
        machine = machine_section(tools["envoy"], cpus, usable_cpus, load_before)
        report = render(profile, started, time.monotonic() - clock_start, machine, sections, commands)
    except BenchmarkError as exc:
        print(f"benchmarks: FAILED, {args.output} not written: {exc}", file=sys.stderr)
        return 1
    finally:
        if scenario is not None:
            scenario.close()
        shutil.rmtree(work_dir, ignore_errors=True)
    for section in sections:
        for finding in section.findings:
            print(f"benchmarks: {finding}", file=sys.stderr)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report, encoding="utf-8")
    print(f"benchmarks: wrote {args.output} in {(time.monotonic() - clock_start) / 60:.1f} minutes",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
