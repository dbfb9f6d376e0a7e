"""/metrics, /healthz and /readyz of `serve --workers 2`, after a mix of Checks and reloads."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.check_requests import build_check_request, send_check
from tests.support.processes import grpc_health_status
from tests.test_workers import free_port

REPO = Path(__file__).resolve().parent.parent

ALLOW_PUBLIC = textwrap.dedent("""\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: public, namespace: demo}
    spec:
      rules:
      - to:
        - operation:
            paths: ["/public"]
    """)
DRY_RUN_DENY = textwrap.dedent("""\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata:
      name: shadow
      namespace: demo
      annotations: {istio.io/dry-run: "true"}
    spec:
      action: DENY
      rules:
      - to:
        - operation:
            paths: ["/public"]
    """)


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def sample(text: str, name: str, labels: str = "") -> float:
    """Return the value of one sample line of the exposition, or 0 when it is missing."""
    pattern = re.escape(name) + (r"\{" + labels + r"\}" if labels else r"(?:\{\})?") + r" ([0-9.e+-]+)"
    match = re.search("^" + pattern + "$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def wait_until(condition, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return bool(condition())


def test_metrics_of_two_workers(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "allow.yaml").write_text(ALLOW_PUBLIC)
    port, metrics_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    metrics_url = f"http://127.0.0.1:{metrics_port}"
    log = tmp_path / "serve.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "extauthz", "serve", "--policies", str(policies), "--listen", address,
             "--workers", "2", "--workload-namespace", "demo", "--metrics-listen", f"127.0.0.1:{metrics_port}",
             "--log-level", "WARNING"],
            stdout=output, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        assert wait_until(lambda: grpc_health_status(address) == "SERVING"), log.read_text()
        assert wait_until(lambda: http_get(metrics_url + "/readyz")[0] == 200), log.read_text()
        assert http_get(metrics_url + "/healthz")[0] == 200

        for _ in range(30):
            assert send_check(address, build_check_request(path="/public")).status.code == 0
        for _ in range(20):
            assert send_check(address, build_check_request(path="/private")).status.code != 0
        (policies / "shadow.yaml").write_text(DRY_RUN_DENY)  # a reload in each worker
        assert wait_until(lambda: sample(http_get(metrics_url + "/metrics")[1], "extauthz_policy_reloads_total",
                                         'outcome="loaded"') == 4)
        (policies / "broken.yaml").write_text("kind: [")  # rejected in each worker
        assert wait_until(lambda: sample(http_get(metrics_url + "/metrics")[1], "extauthz_policy_reloads_total",
                                         'outcome="rejected"') == 2)
        for _ in range(10):
            assert send_check(address, build_check_request(path="/public")).status.code == 0

        status, text = http_get(metrics_url + "/metrics")
        assert status == 200
        allowed = sample(text, "extauthz_decisions_total", 'decision="allow",reason="allowed_by_policy"')
        denied = sample(text, "extauthz_decisions_total", 'decision="deny",reason="no_allow_policy_matched"')
        assert allowed == 40
        assert denied == 20
        assert sample(text, "extauthz_check_duration_seconds_count") == 60
        assert sample(text, "extauthz_dry_run_results_total",
                      'result="denied by ns\\[demo\\]-policy\\[shadow\\]-rule\\[0\\]"') == 10
        assert sample(text, "extauthz_policy_reloads_total", 'outcome="loaded"') == 4
        assert sample(text, "extauthz_policy_reloads_total", 'outcome="rejected"') == 2
        served = re.findall(r'^extauthz_policy_revision_info\{.*revision="(\w+)".*\} 1\.0$', text, re.MULTILINE)
        assert len(served) == 2  # one series per worker
        assert len(set(served)) == 1
        ready = re.findall(r"^extauthz_ready\{.*\} ([0-9.]+)$", text, re.MULTILINE)
        assert ready.count("1.0") == 2

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
