"""The real grpcurl binary against a running extauthz: reflection and health."""

from __future__ import annotations

import json
import subprocess
import textwrap
from collections.abc import Iterator

import pytest

from tests.support.processes import REPO_ROOT, ExtauthzProcess, find_tool

ALLOW_ALL = textwrap.dedent(
    """\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata:
      name: allow-all
      namespace: demo
    spec:
      action: ALLOW
      rules:
      - {}
    """
)


def run_grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [find_tool("grpcurl"), *args],
        cwd=REPO_ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture(scope="module")
def extauthz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExtauthzProcess]:
    policies_dir = tmp_path_factory.mktemp("grpcurl-policies")
    (policies_dir / "allow.yaml").write_text(ALLOW_ALL, encoding="utf-8")

    work_dir = tmp_path_factory.mktemp("grpcurl-extauthz")
    with ExtauthzProcess(policies_dir, work_dir=work_dir) as process:
        process.wait_serving(timeout=20)
        yield process


def test_grpcurl_lists_services(extauthz: ExtauthzProcess) -> None:
    result = run_grpcurl("-plaintext", extauthz.address, "list")

    assert result.returncode == 0, result.stderr
    services = result.stdout.split()
    assert "envoy.service.auth.v3.Authorization" in services
    assert "grpc.health.v1.Health" in services
    reflection_services = {
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
    assert reflection_services & set(services), services


def test_grpcurl_describes_check_method(extauthz: ExtauthzProcess) -> None:
    result = run_grpcurl(
        "-plaintext",
        extauthz.address,
        "describe",
        "envoy.service.auth.v3.Authorization",
    )

    assert result.returncode == 0, result.stderr
    assert "rpc Check" in result.stdout
    assert ".envoy.service.auth.v3.CheckRequest" in result.stdout


@pytest.mark.parametrize("service", ["", "envoy.service.auth.v3.Authorization"])
def test_grpcurl_health_check_serving(extauthz: ExtauthzProcess, service: str) -> None:
    request = json.dumps({"service": service})

    result = run_grpcurl("-plaintext", "-d", request, extauthz.address, "grpc.health.v1.Health/Check")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"status": "SERVING"}


def test_grpcurl_check_allows_request(extauthz: ExtauthzProcess) -> None:
    # Sent through reflection only, so this also shows that the server publishes
    # the descriptors of every message that CheckRequest uses.
    request = {
        "attributes": {
            "request": {"http": {"method": "GET", "path": "/get", "host": "httpbin.demo"}},
            "contextExtensions": {"namespace": "demo", "label.app": "httpbin"},
        }
    }

    result = run_grpcurl(
        "-plaintext",
        "-d",
        json.dumps(request),
        extauthz.address,
        "envoy.service.auth.v3.Authorization/Check",
    )

    assert result.returncode == 0, result.stderr
    response = json.loads(result.stdout)
    assert response.get("status", {}).get("code", 0) == 0, result.stdout
    # grpcurl 1.8 prints proto field names. Other versions may print JSON names.
    assert {"ok_response", "okResponse"} & response.keys(), result.stdout
