"""The Check servicer on a real in-process gRPC server: request mapping and failing closed."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extauthz.config import ServeConfig
from extauthz.server import ExtAuthzServer
from tests.support.check_requests import build_check_request, send_check

ALLOW_GET_ONLY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: demo}
spec:
  selector:
    matchLabels: {app: httpbin}
  rules:
  - to:
    - operation:
        methods: [GET]
    when:
    - key: request.headers[x-tag]
      notValues: ["a"]
"""


def start_server(directory: Path, **config: object) -> ExtAuthzServer:
    server = ExtAuthzServer(ServeConfig(policies=directory, listen="127.0.0.1:0", watch=False, **config))  # type: ignore[arg-type]
    server.start()
    return server


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ExtAuthzServer, str]]:
    (tmp_path / "policy.yaml").write_text(textwrap.dedent(ALLOW_GET_ONLY))
    server = start_server(tmp_path, workload_namespace="demo", workload_labels={"app": "httpbin"})
    yield server, f"127.0.0.1:{server.port}"
    server.stop(0)


def health_status(address: str, service: str = "") -> str:
    with grpc.insecure_channel(address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def test_failure_inside_evaluation_answers_deny(served: tuple[ExtAuthzServer, str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    server, address = served

    def broken_authorize(*args: object, **kwargs: object) -> None:
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(server.authorizer, "authorize", broken_authorize)
    response = send_check(address, build_check_request())
    assert response.status.code == grpc.StatusCode.INTERNAL.value[0]
    assert response.denied_response.status.code == 403
    assert response.dynamic_metadata["reason"] == "internal_error"
    assert "evaluation failed" not in response.denied_response.body


def test_decision_follows_policy(served: tuple[ExtAuthzServer, str]) -> None:
    _, address = served
    allowed = send_check(address, build_check_request())
    denied = send_check(address, build_check_request(method="POST"))
    assert allowed.status.code == 0
    assert allowed.dynamic_metadata["policy"] == "demo/get-only"
    assert denied.status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert denied.denied_response.body == "RBAC: access denied"


def test_repeated_headers_in_header_map_joined(served: tuple[ExtAuthzServer, str]) -> None:
    _, address = served
    request = build_check_request()
    for value in ("a", "b"):
        entry = request.attributes.request.http.header_map.headers.add()
        entry.key = "x-tag"
        entry.raw_value = value.encode()
    # "a,b" is not "a", so notValues ["a"] matches and the request is allowed.
    assert send_check(address, request).status.code == 0
    single = build_check_request(headers={"x-tag": "a"})
    assert send_check(address, single).status.code != 0


def test_nul_in_path_answers_bad_request(served: tuple[ExtAuthzServer, str]) -> None:
    _, address = served
    response = send_check(address, build_check_request(path="/a%00b"))
    assert response.denied_response.status.code == 400


def test_workload_from_destination_peer(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(textwrap.dedent(ALLOW_GET_ONLY))
    server = start_server(tmp_path)
    address = f"127.0.0.1:{server.port}"
    try:
        request = build_check_request(method="POST")
        request.attributes.ClearField("context_extensions")
        assert send_check(address, request).dynamic_metadata["reason"] == "workload_unknown"
        request.attributes.destination.principal = "spiffe://cluster.local/ns/demo/sa/httpbin"
        request.attributes.destination.labels["app"] = "httpbin"
        assert send_check(address, request).dynamic_metadata["reason"] == "no_allow_policy_matched"
        request.attributes.destination.labels["app"] = "other"
        assert send_check(address, request).status.code == 0
    finally:
        server.stop(0)


def test_invalid_policies_keep_health_not_serving(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n")
    server = start_server(tmp_path, workload_namespace="demo")
    address = f"127.0.0.1:{server.port}"
    try:
        assert health_status(address) == "NOT_SERVING"
        assert health_status(address, "envoy.service.auth.v3.Authorization") == "NOT_SERVING"
        response = send_check(address, build_check_request())
        assert response.dynamic_metadata["reason"] == "policies_not_loaded"
        (tmp_path / "bad.yaml").write_text(textwrap.dedent(ALLOW_GET_ONLY))
        assert server.reloader.reload()
        assert health_status(address) == "SERVING"
        assert send_check(address, build_check_request()).status.code == 0
    finally:
        server.stop(0)
