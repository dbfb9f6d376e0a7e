"""Policy reload of a running extauthz process, observed through gRPC Check calls.

The server watches its policy directory. A valid change replaces the whole policy set,
and an invalid file keeps the previous set serving and logs FILE:LINE of the error.
Every wait polls with a deadline, because the reload runs in the background.
"""

from __future__ import annotations

import os
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.check_requests import (
    build_check_request,
    send_check,
    status_code_name,
)
from tests.support.processes import ExtauthzProcess, grpc_health_status

RELOAD_TIMEOUT_S = 10.0

ALLOW_ALL = textwrap.dedent(
    """\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata:
      name: httpbin
      namespace: demo
    spec:
      selector:
        matchLabels:
          app: httpbin
      action: ALLOW
      rules:
      - {}
    """
)

# An ALLOW policy without rules matches no request, so it denies everything.
DENY_ALL = textwrap.dedent(
    """\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata:
      name: httpbin
      namespace: demo
    spec:
      selector:
        matchLabels:
          app: httpbin
      action: ALLOW
    """
)

# ALLOW_ALL with a stray "}" on line 8. If the server dropped this file instead of
# keeping the previous set, no ALLOW policy would remain and requests would pass.
ALLOW_ALL_SYNTAX_ERROR_LINE = 8
ALLOW_ALL_SYNTAX_ERROR = textwrap.dedent(
    """\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata:
      name: httpbin
      namespace: demo
    spec:
      selector:
        matchLabels: {app: httpbin}}
      action: ALLOW
      rules:
      - {}
    """
)

DENY_GET = textwrap.dedent(
    """\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata:
      name: deny-get
      namespace: demo
    spec:
      selector:
        matchLabels:
          app: httpbin
      action: DENY
      rules:
      - to:
        - operation:
            methods: ["GET"]
    """
)

# DENY_GET plus `pathPrefix`, which Istio's Operation does not have, on line 15.
# A server that ignored unknown fields would load it and deny GET requests.
DENY_GET_UNKNOWN_FIELD_LINE = 15
DENY_GET_UNKNOWN_FIELD = DENY_GET + "        pathPrefix: /\n"

# A valid policy of another namespace, so that every reload reads more than one file.
OTHER_NAMESPACE = textwrap.dedent(
    """\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata:
      name: deny-all
      namespace: other
    spec: {}
    """
)


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` in one rename, so the watcher never reads a half-written file."""
    # The ".tmp" suffix keeps the server from loading the temporary file itself.
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def check_decision(address: str) -> str:
    response = send_check(address, build_check_request(method="GET", path="/get"))
    return status_code_name(response)


def wait_for_decision(address: str, expected: str, timeout: float = RELOAD_TIMEOUT_S) -> str:
    """Poll Check until it returns `expected` or `timeout` seconds pass, and return the last code."""
    deadline = time.monotonic() + timeout
    decision = check_decision(address)
    while decision != expected and time.monotonic() < deadline:
        time.sleep(0.1)
        decision = check_decision(address)
    return decision


def wait_for_log(process: ExtauthzProcess, text: str, timeout: float = RELOAD_TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in process.log_text():
            return True
        time.sleep(0.1)
    return text in process.log_text()


@contextmanager
def running_extauthz(policies_dir: Path, work_dir: Path) -> Iterator[ExtauthzProcess]:
    with ExtauthzProcess(policies_dir, work_dir=work_dir) as process:
        process.wait_serving(timeout=20)
        yield process


def make_policies_dir(tmp_path: Path, policy_text: str) -> Path:
    policies_dir = tmp_path / "policies"
    policies_dir.mkdir()
    (policies_dir / "other.yaml").write_text(OTHER_NAMESPACE, encoding="utf-8")
    (policies_dir / "policy.yaml").write_text(policy_text, encoding="utf-8")
    return policies_dir


def test_rewritten_policy_changes_decision(tmp_path: Path) -> None:
    policies_dir = make_policies_dir(tmp_path, ALLOW_ALL)

    with running_extauthz(policies_dir, tmp_path / "server") as process:
        assert check_decision(process.address) == "OK"

        write_atomically(policies_dir / "policy.yaml", DENY_ALL)

        assert wait_for_decision(process.address, "PERMISSION_DENIED") == "PERMISSION_DENIED"


def test_invalid_yaml_keeps_previous_set(tmp_path: Path) -> None:
    policies_dir = make_policies_dir(tmp_path, DENY_ALL)
    location = f"policy.yaml:{ALLOW_ALL_SYNTAX_ERROR_LINE}"

    with running_extauthz(policies_dir, tmp_path / "server") as process:
        assert check_decision(process.address) == "PERMISSION_DENIED"

        write_atomically(policies_dir / "policy.yaml", ALLOW_ALL_SYNTAX_ERROR)

        assert wait_for_log(process, location), process.log_text()
        assert check_decision(process.address) == "PERMISSION_DENIED"
        assert grpc_health_status(process.address) == "SERVING"

        write_atomically(policies_dir / "policy.yaml", ALLOW_ALL)

        assert wait_for_decision(process.address, "OK") == "OK"


def test_unknown_field_keeps_previous_set(tmp_path: Path) -> None:
    policies_dir = make_policies_dir(tmp_path, ALLOW_ALL)
    deny_get_path = policies_dir / "deny-get.yaml"
    location = f"deny-get.yaml:{DENY_GET_UNKNOWN_FIELD_LINE}"

    with running_extauthz(policies_dir, tmp_path / "server") as process:
        assert check_decision(process.address) == "OK"

        write_atomically(deny_get_path, DENY_GET_UNKNOWN_FIELD)

        assert wait_for_log(process, location), process.log_text()
        assert "pathPrefix" in process.log_text()
        assert check_decision(process.address) == "OK"
        assert grpc_health_status(process.address) == "SERVING"

        write_atomically(deny_get_path, DENY_GET)

        assert wait_for_decision(process.address, "PERMISSION_DENIED") == "PERMISSION_DENIED"

        deny_get_path.unlink()

        assert wait_for_decision(process.address, "OK") == "OK"
