"""`extauthz explain` and the Admin gRPC service, as users call them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from tests.support.processes import REPO_ROOT, ExtauthzProcess, find_tool
from tests.test_workers import free_port

DEMO_ISSUER = "https://demo.extauthz.local"


def demo_token(ttl_s: int = 600, **claims: object) -> str:
    key = load_pem_private_key((REPO_ROOT / "deploy/demo/demo-signing-key.pem").read_bytes(), password=None)
    now = int(time.time())
    payload = {"iss": DEMO_ISSUER, "sub": "alice", "aud": "httpbin.demo", "iat": now - 10, "exp": now + ttl_s,
               **claims}
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": "demo-1"})  # type: ignore[arg-type]


def explain(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "extauthz", "explain", "--policies", "policies",
                           "--namespace", "demo", "--label", "app=httpbin", *args],
                          input=stdin, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)


def test_explain_allow_names_rule() -> None:
    result = explain("--path", "/anything", "--token", demo_token())
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "RequestAuthentication: demo/demo-jwt" in lines
    assert any(line.startswith("token verified by RequestAuthentication demo/demo-jwt") for line in lines)
    assert "ALLOW demo/require-jwt rules[0] matched" in lines
    assert lines[-1] == "decision: ALLOW (reason allowed_by_policy) by demo/require-jwt rules[0]"


def test_explain_bad_token() -> None:
    result = explain("--path", "/anything", "--token", demo_token(ttl_s=-3600))
    assert result.returncode == 0, result.stderr
    assert "token rejected: Jwt is expired (reason jwt_expired)" in result.stdout
    assert result.stdout.splitlines()[-1] == "decision: DENY 401 (reason jwt_expired)"


def test_explain_deny_policy_match() -> None:
    result = explain("--path", "/admin", "--token", demo_token())
    assert "DENY demo/admin-needs-group rules[0] matched" in result.stdout
    expected = "decision: DENY 403 (reason denied_by_policy) by demo/admin-needs-group rules[0]"
    assert result.stdout.splitlines()[-1] == expected


def test_explain_no_allow_match_says_why() -> None:
    result = explain("--path", "/anything")
    assert ("ALLOW demo/require-jwt did not match: rules[0] from: no source matched "
            "(source 0 requestPrincipals did not match); rules[1] to: no operation matched "
            "(operation 0 paths did not match)") in result.stdout
    assert result.stdout.splitlines()[-1] == "decision: DENY 403 (reason no_allow_policy_matched)"


def test_explain_json_from_stdin() -> None:
    request = {"method": "GET", "path": "/public/a?x=1", "headers": {"X-Trace": "1"}}
    result = explain("--request", "-", "--format", "json", stdin=json.dumps(request))
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["allowed"] is True
    assert (answer["policy"], answer["rule"]) == ("demo/require-jwt", 1)
    assert answer["trace"][-1].startswith("decision: ALLOW")


def test_explain_rejects_unknown_field() -> None:
    result = explain("--request", "-", stdin=json.dumps({"pathh": "/"}))
    assert result.returncode == 2
    assert "unknown field(s) pathh" in result.stderr


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([find_tool("grpcurl"), "-plaintext", *args], capture_output=True, text=True, timeout=30,
                          cwd=REPO_ROOT)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[ExtauthzProcess, str]]:
    admin_address = f"127.0.0.1:{free_port()}"
    with ExtauthzProcess(REPO_ROOT / "policies", "--admin-listen", admin_address) as process:
        process.wait_serving()
        yield process, admin_address


def test_admin_only_on_its_listener(served: tuple[ExtauthzProcess, str]) -> None:
    process, admin_address = served
    assert "extauthz.admin.v1.Admin" not in grpcurl(process.address, "list").stdout
    listed = grpcurl(admin_address, "list")
    assert listed.returncode == 0, listed.stderr
    assert "extauthz.admin.v1.Admin" in listed.stdout.split()


def test_grpcurl_admin_explain(served: tuple[ExtauthzProcess, str]) -> None:
    _, admin_address = served
    request = {"request": {"path": "/admin", "token": demo_token(),
                           "workload": {"namespace": "demo", "labels": {"app": "httpbin"}}}}
    result = grpcurl("-d", json.dumps(request), admin_address, "extauthz.admin.v1.Admin/Explain")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer.get("allowed", False) is False
    assert answer["reason"] == "denied_by_policy"
    assert answer["policy"] == "demo/admin-needs-group"
    assert answer.get("httpStatus", answer.get("http_status")) == 403
    assert "DENY demo/admin-needs-group rules[0] matched" in answer["trace"]


def test_grpcurl_admin_status_and_list(served: tuple[ExtauthzProcess, str]) -> None:
    _, admin_address = served
    status = grpcurl("-d", "{}", admin_address, "extauthz.admin.v1.Admin/Status")
    assert status.returncode == 0, status.stderr
    answer = json.loads(status.stdout)
    assert answer["serving"] is True
    assert len(answer["revision"]) == 12
    assert answer["reloads"] == 1

    listed = grpcurl("-d", json.dumps({"workload": {"namespace": "demo", "labels": {"app": "httpbin"}}}),
                     admin_address, "extauthz.admin.v1.Admin/ListPolicies")
    assert listed.returncode == 0, listed.stderr
    names = {(p["kind"], p["name"]) for p in json.loads(listed.stdout)["policies"]}
    assert names == {("RequestAuthentication", "demo-jwt"), ("AuthorizationPolicy", "require-jwt"),
                     ("AuthorizationPolicy", "admin-needs-group")}


def test_admin_on_main_listener_by_default(tmp_path: Path) -> None:
    with ExtauthzProcess(REPO_ROOT / "policies", work_dir=tmp_path) as process:
        process.wait_serving()
        result = grpcurl("-d", "{}", process.address, "extauthz.admin.v1.Admin/Status")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["serving"] is True


def test_explain_accepts_admin_request_form() -> None:
    request = {"path": "/public/a", "workload": {"namespace": "demo", "labels": {"app": "httpbin"}}}
    result = subprocess.run([sys.executable, "-m", "extauthz", "explain", "--policies", "policies",
                             "--request", "-", "--format", "json"],
                            input=json.dumps(request), capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["allowed"] is True
