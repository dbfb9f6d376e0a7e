"""The command line as users run it: validate, token, and flags from the environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from extauthz.cli import build_parser
from extauthz.engine import Authorizer, PolicySnapshot
from extauthz.jwks import JwksCache
from extauthz.policy import load_policy_dir
from extauthz.request import RequestContext, Workload

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "extauthz", *args], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env=env)


def test_validate_example_policies() -> None:
    result = run_cli("validate", "policies")
    assert result.returncode == 0, result.stdout + result.stderr
    revision = load_policy_dir(REPO / "policies").revision
    assert f"valid, revision {revision}" in result.stdout


def test_validate_reports_file_line_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: bad, namespace: foo}
        spec:
          rules:
          - from:
            - source:
                ipBlocks: ["10.0.0.0/33"]
        """))
    result = run_cli("validate", str(tmp_path))
    assert result.returncode == 1
    assert result.stdout.startswith(f"{bad}:8: AuthorizationPolicy/foo/bad: "
                                    "spec.rules[0].from[0].source.ipBlocks[0]: '10.0.0.0/33'")

    as_json = run_cli("validate", str(tmp_path), "--format", "json")
    assert as_json.returncode == 1
    (problem,) = json.loads(as_json.stdout)["problems"]
    assert (problem["file"], problem["line"], problem["severity"]) == (str(bad), 8, "error")


def test_token_accepted_by_example_policies() -> None:
    result = run_cli("token", "--key", "deploy/demo/demo-signing-key.pem", "--issuer", "https://demo.extauthz.local",
                     "--audience", "httpbin.demo", "--kid", "demo-1", "--claim", 'groups=["admin"]')
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()

    policy_set = load_policy_dir(REPO / "policies")
    jwks = JwksCache()
    jwks.update(policy_set.inline_jwks, policy_set.remote_jwks)
    authorizer = Authorizer(jwks, PolicySnapshot(policy_set, "istio-system"))
    workload = Workload.of("demo", {"app": "httpbin"})
    ctx = RequestContext(path="/admin", raw_path="/admin", host="httpbin.demo",
                         headers={"authorization": f"Bearer {token}"})
    decision = authorizer.decide(ctx, workload)
    assert decision.allowed, decision.reason
    assert dict(decision.headers_to_set) == {"x-user": "alice"}
    # Without a token the groups claim is absent, so the DENY rule's notValues matches.
    without_token = authorizer.decide(RequestContext(path="/admin", raw_path="/admin", host="h"), workload)
    assert without_token.reason == "denied_by_policy"
    assert without_token.policy == "demo/admin-needs-group"


def test_flags_read_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only parsed: nothing listens on these addresses.
    monkeypatch.setenv("EXTAUTHZ_LISTEN", "127.0.0.1:0")
    monkeypatch.setenv("EXTAUTHZ_WORKLOAD_LABEL", "app=httpbin,version=v1")
    monkeypatch.setenv("EXTAUTHZ_XFF_NUM_TRUSTED_HOPS", "2")
    monkeypatch.setenv("EXTAUTHZ_MAX_CONNECTION_AGE", "0.5")
    args = build_parser().parse_args(["serve"])
    assert args.listen == "127.0.0.1:0"
    assert dict(args.workload_label) == {"app": "httpbin", "version": "v1"}
    assert int(args.xff_num_trusted_hops) == 2
    assert float(args.max_connection_age) == 0.5
    overridden = build_parser().parse_args(["serve", "--listen", "[::1]:0"])
    assert overridden.listen == "[::1]:0"


def test_serve_rejects_bad_flag_value() -> None:
    result = run_cli("serve", "--workload-label", "no-equals-sign")
    assert result.returncode == 2
    assert "invalid label 'no-equals-sign': write KEY=VALUE" in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["serve", "--listen", "localhost"], {}, "invalid address 'localhost': write HOST:PORT"),
        (["serve"], {"EXTAUTHZ_LOG_LEVEL": "verbose"}, "invalid value 'verbose': choose one of DEBUG, INFO"),
        (["serve"], {"EXTAUTHZ_LOG_FORMAT": "yaml"}, "invalid value 'yaml': choose one of text, json"),
        (["serve", "--max-connection-age", "-1"], {}, "-1 is negative; give 0 or more"),
        (["serve"], {"EXTAUTHZ_MAX_CONNECTION_AGE": "soon"}, "'soon' is not a number"),
        (["serve", "--max-connection-age", "nan"], {}, "nan is out of range; give at most 2147483 seconds"),
        (["serve", "--max-connection-age", "1e7"], {}, "1e7 is out of range; give at most 2147483 seconds"),
        (["serve", "--grace-period", "inf"], {}, "inf is out of range"),
        (["serve", "--shutdown-delay", "-2"], {}, "-2 is negative; give 0 or more"),
    ],
)
def test_serve_rejects_invalid_values(args: list[str], env: dict[str, str], message: str) -> None:
    result = run_cli(*args, env={**os.environ, **env})
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_token_rejects_unquoted_json_claim() -> None:
    result = run_cli("token", "--key", "deploy/demo/demo-signing-key.pem", "--issuer", "https://i.test",
                     "--claim", "groups=[admin]")
    assert result.returncode == 2
    assert "groups: '[admin]' is not valid JSON" in result.stderr
