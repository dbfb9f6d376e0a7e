"""Run profiles, the CPU split, and what every section shares during one run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.loadgen import CommandLog
from benchmarks.scenario import Scenario


@dataclass(frozen=True)
class Profile:
    """How long each measurement runs. Each section alternates its variants for `rounds` rounds."""

    name: str
    rounds: int
    direct_round_s: float  # target length of one h2load round; the request count is calibrated to it
    envoy_round_s: int  # wrk -d for the throughput rounds
    envoy_latency_round_s: int  # wrk -d for the one-connection rounds
    engine_round_s: float  # target length of one timed loop of warm decisions
    engine_cold_decisions: int  # distinct tokens, so decisions per cold loop
    scaling_round_s: float


DEFAULT_PROFILE = Profile("default", rounds=5, direct_round_s=4.0, envoy_round_s=10, envoy_latency_round_s=5,
                          engine_round_s=0.2, engine_cold_decisions=600, scaling_round_s=5.0)
QUICK_PROFILE = Profile("quick", rounds=3, direct_round_s=1.5, envoy_round_s=3, envoy_latency_round_s=2,
                        engine_round_s=0.05, engine_cold_decisions=150, scaling_round_s=2.0)


@dataclass(frozen=True)
class CpuSplit:
    """CPU lists (taskset --cpu-list values) of the servers, of the load generators, and of both."""

    server: str
    client: str
    both: str

    @classmethod
    def of(cls, cpus: list[int]) -> CpuSplit:
        if len(cpus) >= 2:
            return cls(str(cpus[0]), str(cpus[1]), f"{cpus[0]},{cpus[1]}")
        # One CPU: servers and load generators compete, which the report states.
        return cls(str(cpus[0]), str(cpus[0]), str(cpus[0]))

    @property
    def separate(self) -> bool:
        return self.server != self.client


@dataclass
class Section:
    """The rendered Markdown of one section and what looked wrong in it."""

    title: str
    markdown: str
    findings: list[str] = field(default_factory=list)


@dataclass
class BenchContext:
    profile: Profile
    cpus: CpuSplit
    work_dir: Path
    scenario: Scenario
    commands: CommandLog
    serve_help: str

    def serve_has_flag(self, flag: str) -> bool:
        return flag in self.serve_help

    def single_process_flags(self) -> list[str]:
        """Flags that make `extauthz serve` run one process, whatever this checkout's default is."""
        return ["--workers", "1"] if self.serve_has_flag("--workers") else []
