"""Istio behaviour cases from tests/cases/istio_cases.yaml, one pytest case per id.

Each case writes its policies to a fresh directory and starts the product's gRPC server
on 127.0.0.1 port 0. The server's fetcher resolves the issuers' hosts to a local JWKS
server. The test sends one Check over a real channel and compares the response with
the case's expectations.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.protobuf import text_format
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extauthz.config import ServeConfig
from extauthz.errors import PolicyError
from extauthz.policy import load_policy_dir
from extauthz.server import AUTHORIZATION_SERVICE, ExtAuthzServer
from tests.case_harness import (
    POLICY_FILE_NAME,
    TOKEN_PAYLOAD,
    CaseRequest,
    HostRewritingFetcher,
    header_values,
    load_case_table,
    make_fixture_keys,
    overwrites,
    placeholder_values,
    prepare_request,
    publish_fixture_endpoints,
    remove_query_parameters,
    token_payload,
    write_policies,
)
from tests.support.http_servers import LocalHttpServer
from tests.support.keys import SigningKey

TABLE = load_case_table()
ROOT_NAMESPACE = TABLE.defaults["root_namespace"]

# Timeouts in seconds for connecting the channel and for the Check call itself.
CONNECT_TIMEOUT_S = 5.0
CHECK_TIMEOUT_S = 5.0


@pytest.fixture(scope="session")
def fixture_keys() -> dict[str, SigningKey]:
    return make_fixture_keys(TABLE.fixtures)


@pytest.fixture(scope="session")
def jwks_server(fixture_keys: dict[str, SigningKey]) -> Iterator[LocalHttpServer]:
    with LocalHttpServer() as server:
        publish_fixture_endpoints(server, TABLE.fixtures, fixture_keys)
        yield server


@pytest.fixture(scope="session")
def placeholders(fixture_keys: dict[str, SigningKey]) -> dict[str, str]:
    return placeholder_values(TABLE.fixtures, fixture_keys)


@contextmanager
def running_server(policy_dir: Path, jwks_server: LocalHttpServer) -> Iterator[int]:
    """Start the product's server for `policy_dir` on a free port and yield the port."""
    config = ServeConfig(policies=policy_dir, listen="127.0.0.1:0", root_namespace=ROOT_NAMESPACE)
    server = ExtAuthzServer(config, fetcher=HostRewritingFetcher(jwks_server))
    server.start()
    try:
        yield server.port
    finally:
        server.stop()


@contextmanager
def connected_channel(port: int) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=CONNECT_TIMEOUT_S)
        yield channel


def send_check(channel: grpc.Channel, check: external_auth_pb2.CheckRequest) -> external_auth_pb2.CheckResponse:
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    return stub.Check(check, timeout=CHECK_TIMEOUT_S)


def authorization_health(channel: grpc.Channel) -> int:
    """Return the health status the server reports for the Authorization service."""
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service=AUTHORIZATION_SERVICE)
    return stub.Check(request, timeout=CHECK_TIMEOUT_S).status


def describe(response: external_auth_pb2.CheckResponse) -> str:
    return "CheckResponse:\n" + text_format.MessageToString(response)


def assert_load_rejected(policy_dir: Path, policy_file: Path | None, expected: dict[str, Any]) -> None:
    assert policy_file is not None, "a config_rejected case needs policies"
    with pytest.raises(PolicyError) as raised:
        load_policy_dir(policy_dir)

    error = raised.value
    message = str(error)
    line_count = len(policy_file.read_text(encoding="utf-8").splitlines())
    assert error.problems, "PolicyError without problems"
    assert POLICY_FILE_NAME in message
    for problem in error.problems:
        assert Path(problem.file).name == POLICY_FILE_NAME, str(problem)
        assert 1 <= problem.line <= line_count, str(problem)
        assert f"{problem.file}:{problem.line}" in message
        # "<kind>/<namespace>/<name>: <field path>: <what is wrong>"
        assert re.match(r"AuthorizationPolicy/[\w-]+/[\w-]+: spec[\w.\[\]]*: ", problem.message), str(problem)

    expected_text = expected.get("problem_contains")
    if expected_text:
        assert any(expected_text in problem.message for problem in error.problems), message


def assert_denied(response: external_auth_pb2.CheckResponse, expected: dict[str, Any]) -> None:
    described = describe(response)
    assert response.status.code != code_pb2.OK, described
    assert response.WhichOneof("http_response") == "denied_response", described

    denied = response.denied_response
    assert denied.status.code == expected["status"], described
    if "body" in expected:
        assert denied.body == expected["body"], described
    if "body_one_of" in expected:
        assert denied.body in expected["body_one_of"], described

    for name, constraints in expected.get("response_headers", {}).items():
        values = header_values(denied.headers, name)
        assert len(values) == 1, f"expected one {name} header\n{described}"
        value = values[0]
        if "starts_with" in constraints:
            assert value.startswith(constraints["starts_with"]), value
        if "contains" in constraints:
            assert constraints["contains"] in value, value
        if "not_contains" in constraints:
            assert constraints["not_contains"] not in value, value


def assert_allowed(
    response: external_auth_pb2.CheckResponse,
    expected: dict[str, Any],
    request: CaseRequest,
    tokens: list[str],
) -> None:
    described = describe(response)
    assert response.status.code == code_pb2.OK, described
    assert response.WhichOneof("http_response") == "ok_response", described

    ok = response.ok_response
    upstream = expected.get("upstream", {})
    removed = {name.lower() for name in ok.headers_to_remove}
    set_names = {option.header.key.lower() for option in ok.headers}

    for name in upstream.get("headers_removed", []) + upstream.get("headers_absent", []):
        assert name in removed, f"{name} not in headers_to_remove\n{described}"
        assert name not in set_names, f"{name} set again\n{described}"

    for name, value in upstream.get("headers_set", {}).items():
        expected_value = token_payload(tokens[0]) if value == TOKEN_PAYLOAD else value
        options = [option for option in ok.headers if option.header.key.lower() == name]
        assert [option.header.value for option in options] == [expected_value], described
        assert overwrites(options[0]), f"{name} would be appended to the client's value\n{described}"
        # Envoy applies headers_to_remove after the headers it sets, so listing the name
        # in both would drop the new value.
        assert name not in removed, f"{name} is both set and removed\n{described}"

    for name in upstream.get("headers_unchanged", []):
        assert name not in removed, f"{name} removed\n{described}"
        assert name not in set_names, f"{name} overwritten\n{described}"

    if "path" in upstream:
        upstream_path = remove_query_parameters(request.path, list(ok.query_parameters_to_remove))
        assert upstream_path == upstream["path"], described

    fields = response.dynamic_metadata.fields
    if "principal" in upstream:
        assert "principal" in fields, described
        assert fields["principal"].string_value == upstream["principal"], described

    # AUDIT and dry-run results never change the decision; the service reports them in
    # the decision's dynamic metadata.
    audited = "audited" in fields and fields["audited"].bool_value
    assert audited == expected.get("audited", False), described
    shadow = [value.string_value for value in fields["dry_run"].list_value.values] if "dry_run" in fields else []
    assert shadow == expected.get("dry_run", []), described


@pytest.mark.parametrize("case", TABLE.cases, ids=[case["id"] for case in TABLE.cases])
def test_istio_case(
    case: dict[str, Any],
    tmp_path: Path,
    fixture_keys: dict[str, SigningKey],
    jwks_server: LocalHttpServer,
    placeholders: dict[str, str],
) -> None:
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    policy_file = write_policies(case, policy_dir, placeholders)
    expected = case["expected"]

    if expected["decision"] == "config_rejected":
        assert_load_rejected(policy_dir, policy_file, expected)

        # The server must start without serving the rejected policies, and fail closed.
        with running_server(policy_dir, jwks_server) as port, connected_channel(port) as channel:
            health = authorization_health(channel)
            _, _, check = prepare_request(case, TABLE.defaults, fixture_keys)
            response = send_check(channel, check)
        assert health == health_pb2.HealthCheckResponse.NOT_SERVING
        assert response.status.code != code_pb2.OK, describe(response)
        return

    # The policies of every other case are valid: a rejected set would also deny, with
    # the same 403 body, so this keeps deny cases from passing for the wrong reason.
    if policy_file is not None:
        load_policy_dir(policy_dir)

    with running_server(policy_dir, jwks_server) as port, connected_channel(port) as channel:
        # Tokens are signed now because their time claims are relative to the request time.
        request, tokens, check = prepare_request(case, TABLE.defaults, fixture_keys)
        response = send_check(channel, check)

    if expected["decision"] == "allow":
        assert_allowed(response, expected, request, tokens)
    elif expected["decision"] == "deny":
        assert_denied(response, expected)
    else:
        pytest.fail(f"unknown expected decision {expected['decision']!r}")


def test_case_ids_are_unique() -> None:
    ids = [case["id"] for case in TABLE.cases]
    assert len(ids) == len(set(ids))
