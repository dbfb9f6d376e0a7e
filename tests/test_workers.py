"""`serve --workers 2`: two processes share one port, and a signal stops them all."""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from extauthz import supervisor
from extauthz.config import GRPC_EXPERIMENTS, ServeConfig
from extauthz.supervisor import Supervisor
from tests.support.check_requests import build_check_request, send_check
from tests.support.processes import grpc_health_status

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cpus_allowed(pid: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list for pid {pid}")


def process_environment(pid: str) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode().split("=", 1) for entry in entries if b"=" in entry)


def test_two_workers_share_port_and_stop(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "extauthz", "serve", "--policies", str(REPO / "policies"),
             "--listen", f"127.0.0.1:{port}", "--workers", "2", "--pin-workers", "--workload-namespace", "demo",
             "--workload-label", "app=httpbin"],
            stdout=output, stderr=subprocess.STDOUT, cwd=REPO,
            env={name: value for name, value in os.environ.items() if name != "GRPC_EXPERIMENTS"})
    try:
        deadline = time.monotonic() + 30
        while len(re.findall(r"\[(\d+)\]: listening on", log.read_text())) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = set(re.findall(r"\[(\d+)\]: listening on 127\.0\.0\.1:(\d+)", log.read_text()))
        assert len(pids) == 2, log.read_text()
        assert {p for _, p in pids} == {str(port)}

        address = f"127.0.0.1:{port}"
        while grpc_health_status(address) != "SERVING" and time.monotonic() < deadline:
            time.sleep(0.1)
        response = send_check(address, build_check_request(path="/public/x"))
        assert response.status.code == 0
        available = sorted(os.sched_getaffinity(0))
        pinned = sorted(cpus_allowed(pid) for pid, _ in pids)
        assert pinned == sorted(str(available[i % len(available)]) for i in range(2))
        for pid, _ in pids:  # serve chose grpc's transport before any worker started
            assert process_environment(pid).get("GRPC_EXPERIMENTS") == GRPC_EXPERIMENTS

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert log.read_text().count("extauthz.server") >= 4  # both listened and both stopped
        assert log.read_text().count(": stopped") == 2
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def test_crash_looping_worker_stops_server(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # Built directly, the config carries a NaN connection age that the flag parser would
    # reject, so each worker raises while it starts.
    monkeypatch.setattr(supervisor, "RESTART_DELAY_S", 0.1)
    config = ServeConfig(policies=REPO / "policies", listen=f"127.0.0.1:{free_port()}",
                         max_connection_age_s=math.nan, grace_period_s=1.0, reuse_port=True)

    code = Supervisor(config, 1).run()

    assert code == 1
    assert "the 5th time within 10 s of its start; stopping all workers" in caplog.text
    assert caplog.text.count("restarting it") == 4
