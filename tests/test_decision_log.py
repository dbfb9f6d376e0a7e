"""The decision log of a real server process: one line per Check, never a secret."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from extauthz.decision import Decision, denied
from extauthz.logs import decision_fields, decision_text, text_message
from extauthz.request import RequestContext, Workload
from tests.support.check_requests import build_check_request, send_check
from tests.support.processes import ExtauthzProcess

REPO = Path(__file__).resolve().parent.parent
DEMO_ISSUER = "https://demo.extauthz.local"


def demo_token(**claims: object) -> str:
    key = load_pem_private_key((REPO / "deploy/demo/demo-signing-key.pem").read_bytes(), password=None)
    now = int(time.time())
    payload = {"iss": DEMO_ISSUER, "sub": "alice", "aud": "httpbin.demo", "iat": now, "exp": now + 600, **claims}
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": "demo-1"})  # type: ignore[arg-type]


def wait_for_lines(server: ExtauthzProcess, marker: str, count: int, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in server.log_text().splitlines() if marker in line]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_secrets_never_logged(tmp_path: Path, log_format: str) -> None:
    token = demo_token()
    other_token = demo_token(sub="mallory")
    cookie_secret = "session-secret-4f1c"
    with ExtauthzProcess(REPO / "policies", "--log-level", "DEBUG", "--log-format", log_format,
                         work_dir=tmp_path) as server:
        server.wait_serving()
        headers = {"authorization": f"Bearer {token}", "cookie": f"session={cookie_secret}",
                   "x-request-id": "req-123"}
        allowed = send_check(server.address, build_check_request(path=f"/anything?access_token={other_token}&q=1",
                                                                 headers=headers))
        denied = send_check(server.address, build_check_request(path="/anything?secret=1",
                                                                headers={"authorization": "Bearer a.b.c"}))
        lines = wait_for_lines(server, "extauthz.decision", 4)
        log = server.log_text()

    assert allowed.status.code == 0  # both tokens verify
    assert denied.status.code != 0
    for secret in (token, other_token, cookie_secret, "access_token=", "secret=1", "a.b.c"):
        assert secret not in log
    for part in token.split("."):
        assert part not in log

    decision_lines = [line for line in lines if "req-123" in line and "trace" not in line]
    assert decision_lines, log
    if log_format == "json":
        entry = json.loads(decision_lines[0])
        assert entry["decision_id"] == "req-123"
        assert entry["path"] == "/anything"
        assert entry["workload"] == "demo/app=httpbin"
        assert entry["revision"]
    else:
        assert "decision_id=req-123" in decision_lines[0]
        assert "path=/anything " in decision_lines[0]


WORKLOAD = Workload.of("demo", {"app": "httpbin", "version": "v1"})
ALLOWED = Decision(True, "allowed_by_policy", 0, 200, principal="https://issuer.example/alice",
                   policy="demo/readers", rule=1, revision="0123456789ab")


@pytest.mark.parametrize(("decision", "ctx", "workload", "decision_id"), [
    pytest.param(ALLOWED, RequestContext(method="GET", host="httpbin.demo", path="/get"), WORKLOAD, "req-1",
                 id="allow"),
    pytest.param(denied("no_allow_policy_matched", revision="0123456789ab"),
                 RequestContext(method="POST", host="httpbin.demo", path="/post"), Workload.of("demo"), "req-2",
                 id="deny-without-labels"),
    pytest.param(replace(ALLOWED, audited=True), RequestContext(host="h", path="/audited"), WORKLOAD, "req-3",
                 id="audited"),
    pytest.param(ALLOWED, RequestContext(method="GET", host="h", path="/a b"), WORKLOAD, "req-3",
                 id="path-with-space"),
    pytest.param(replace(ALLOWED, principal='iss/"quoted" sub'), RequestContext(host="h"), WORKLOAD, "req-4",
                 id="principal-with-quotes"),
    pytest.param(replace(ALLOWED, shadow=("denied by ns[demo]-policy[p]-rule[0]",)), RequestContext(host="h"),
                 WORKLOAD, "req-5", id="dry-run"),
    pytest.param(ALLOWED, RequestContext(host=""), WORKLOAD, "req-6", id="empty-host"),
    pytest.param(denied("policies_not_loaded"), RequestContext(host="h"), WORKLOAD, "req-7", id="no-revision"),
    pytest.param(denied("workload_unknown"), None, None, "req-8", id="no-workload"),
])
def test_text_line_matches_fields(decision: Decision, ctx: RequestContext | None,
                                  workload: Workload | None, decision_id: str) -> None:
    assert decision_text(decision, ctx, workload, decision_id, 0.000123) == text_message(
        decision_fields(decision, ctx, workload, decision_id, 0.000123))
