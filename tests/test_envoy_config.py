"""Tests of `extauthz envoy-config`: the real Envoy accepts what it prints, and the printed
bootstrap makes the same decisions as deploy/envoy/envoy.yaml.

The end-to-end tests run one extauthz process with the policies of
tests/test_end_to_end_envoy.py, and two Envoys in front of it and of one echo upstream:
one runs the generated bootstrap and one runs the deploy bootstrap.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from extauthz import cli
from tests.support.envoy_bootstrap import (
    EXT_AUTHZ_FILTER,
    bootstrap_for_test,
    load_deploy_bootstrap,
)
from tests.support.http_servers import EchoUpstream, LocalHttpServer
from tests.support.keys import SigningKey, jwks_document, make_rsa_key, sign_token, standard_claims
from tests.support.processes import REPO_ROOT, EnvoyProcess, ExtauthzProcess, find_tool
from tests.test_end_to_end_envoy import ISSUER, JWKS_PATH, HttpResult, bearer, policy_documents, send_request

WORKLOAD_FLAGS = ("--namespace", "demo", "--label", "app=httpbin")

HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

# Request headers that the upstream receives with a different value on every request.
PER_REQUEST_HEADERS = frozenset({"x-request-id"})

# Response headers whose values must agree between the two bootstraps. The others
# (date, x-envoy-upstream-service-time) change from one request to the next.
COMPARED_RESPONSE_HEADERS = ("content-type", "www-authenticate")

# envoy-data-plane 2.2.0 decorates classmethods with pydantic's model_validator, which
# pydantic 2.12 and later deprecate. pydantic warns once for each of them at import.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Using `@model_validator` with mode='after' on a classmethod is deprecated:DeprecationWarning"
)


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str


def run_envoy_config(*argv: str) -> CommandResult:
    """Run `extauthz envoy-config` with `argv` through the CLI's main() and capture its output.

    In-process, because each subprocess would spend about a second importing pydantic.
    """
    stdout = io.StringIO()
    stderr = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            exit_code = cli.main(["envoy-config", *argv])
        except SystemExit as exc:
            # argparse exits with 2 on invalid flags.
            exit_code = exc.code if isinstance(exc.code, int) else 1
    return CommandResult(exit_code, stdout.getvalue(), stderr.getvalue())


def generated_config(*argv: str) -> dict[str, Any]:
    result = run_envoy_config(*argv)
    assert result.exit_code == 0, result.stderr
    return yaml.safe_load(result.stdout)


def envoy_validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [find_tool("envoy"), "--mode", "validate", "-c", str(path)],
        cwd=REPO_ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def http_connection_manager(bootstrap: dict[str, Any]) -> dict[str, Any]:
    listener = bootstrap["static_resources"]["listeners"][0]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def named(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    matches = [item for item in items if item.get("name") == name]
    assert len(matches) == 1, f"expected one item named {name!r} in {items}"
    return matches[0]


# --- Output of the command --------------------------------------------------------------


@pytest.mark.parametrize("output_format", ["yaml", "json"])
def test_bootstrap_passes_envoy_validate(tmp_path: Path, output_format: str) -> None:
    result = run_envoy_config(*WORKLOAD_FLAGS, "--bootstrap", "--format", output_format)
    assert result.exit_code == 0, result.stderr
    bootstrap_path = tmp_path / f"envoy.{output_format}"
    bootstrap_path.write_text(result.stdout, encoding="utf-8")

    validation = envoy_validate(bootstrap_path)

    output = validation.stdout + validation.stderr
    assert validation.returncode == 0, output
    assert "OK" in validation.stdout, output


def test_bootstrap_with_dns_names_passes_validate(tmp_path: Path) -> None:
    result = run_envoy_config(
        *WORKLOAD_FLAGS,
        "--bootstrap",
        "--extauthz-address", "extauthz.demo.svc.cluster.local:9001",
        "--upstream", "[::1]:8000",
    )
    assert result.exit_code == 0, result.stderr
    bootstrap_path = tmp_path / "envoy.yaml"
    bootstrap_path.write_text(result.stdout, encoding="utf-8")

    validation = envoy_validate(bootstrap_path)

    assert validation.returncode == 0, validation.stdout + validation.stderr
    clusters = yaml.safe_load(result.stdout)["static_resources"]["clusters"]
    # STATIC clusters accept only IP addresses, so a host name needs DNS resolution.
    assert named(clusters, "extauthz")["type"] == "STRICT_DNS"
    assert named(clusters, "upstream")["type"] == "STATIC"


def test_pieces_have_fail_closed_filter() -> None:
    pieces = generated_config(*WORKLOAD_FLAGS)

    assert list(pieces) == ["http_filters", "typed_per_filter_config", "clusters"]
    assert [entry["name"] for entry in pieces["http_filters"]] == [EXT_AUTHZ_FILTER]
    filter_config = pieces["http_filters"][0]["typed_config"]
    assert filter_config["@type"] == "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
    assert filter_config["transport_api_version"] == "V3"
    assert filter_config["grpc_service"] == {"envoy_grpc": {"cluster_name": "extauthz"}, "timeout": "0.500s"}
    assert filter_config["failure_mode_allow"] is False
    assert filter_config["status_on_error"] == {"code": "ServiceUnavailable"}
    assert filter_config["clear_route_cache"] is True
    assert filter_config["validate_mutations"] is True


def test_pieces_name_the_workload() -> None:
    pieces = generated_config("--namespace", "shop", "--label", "app=cart", "--label", "version=v2")

    per_route = pieces["typed_per_filter_config"][EXT_AUTHZ_FILTER]
    assert per_route["@type"] == "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"
    assert per_route["check_settings"]["context_extensions"] == {
        "namespace": "shop",
        "label.app": "cart",
        "label.version": "v2",
    }


def test_pieces_extauthz_cluster() -> None:
    pieces = generated_config(*WORKLOAD_FLAGS)

    assert [cluster["name"] for cluster in pieces["clusters"]] == ["extauthz"]
    cluster = pieces["clusters"][0]
    assert cluster["type"] == "STATIC"
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9001}
    protocol_options = cluster["typed_extension_protocol_options"][HTTP_PROTOCOL_OPTIONS]
    assert protocol_options["@type"] == f"type.googleapis.com/{HTTP_PROTOCOL_OPTIONS}"
    assert protocol_options["explicit_http_config"] == {"http2_protocol_options": {"max_concurrent_streams": 32}}
    assert cluster["health_checks"] == [{
        "timeout": "1s",
        "interval": "5s",
        "unhealthy_threshold": 2,
        "healthy_threshold": 1,
        "grpc_health_check": {"service_name": "envoy.service.auth.v3.Authorization"},
    }]


def test_flags_change_pieces() -> None:
    pieces = generated_config(
        *WORKLOAD_FLAGS,
        "--extauthz-address", "10.1.2.3:7000",
        "--timeout", "250ms",
        "--max-concurrent-streams", "4",
    )

    filter_config = pieces["http_filters"][0]["typed_config"]
    assert filter_config["grpc_service"]["timeout"] == "0.250s"
    cluster = pieces["clusters"][0]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "10.1.2.3", "port_value": 7000}
    protocol_options = cluster["typed_extension_protocol_options"][HTTP_PROTOCOL_OPTIONS]
    assert protocol_options["explicit_http_config"]["http2_protocol_options"] == {"max_concurrent_streams": 4}


def test_json_output_equals_yaml_output() -> None:
    yaml_result = run_envoy_config(*WORKLOAD_FLAGS, "--format", "yaml")
    json_result = run_envoy_config(*WORKLOAD_FLAGS, "--format", "json")

    assert yaml_result.exit_code == 0, yaml_result.stderr
    assert json_result.exit_code == 0, json_result.stderr
    assert json.loads(json_result.stdout) == yaml.safe_load(yaml_result.stdout)


def test_pieces_equal_bootstrap_parts() -> None:
    pieces = generated_config(*WORKLOAD_FLAGS)
    bootstrap = generated_config(*WORKLOAD_FLAGS, "--bootstrap")

    manager = http_connection_manager(bootstrap)
    assert manager["http_filters"][0] == pieces["http_filters"][0]
    routes = manager["route_config"]["virtual_hosts"][0]["routes"]
    assert [route["typed_per_filter_config"] for route in routes] == [pieces["typed_per_filter_config"]]
    assert named(bootstrap["static_resources"]["clusters"], "extauthz") == pieces["clusters"][0]


def test_bootstrap_matches_deploy_choices() -> None:
    bootstrap = generated_config(*WORKLOAD_FLAGS, "--bootstrap")
    deploy = load_deploy_bootstrap()

    generated_manager = http_connection_manager(bootstrap)
    deploy_manager = http_connection_manager(deploy)
    for setting in ("use_remote_address", "normalize_path", "merge_slashes"):
        assert generated_manager[setting] == deploy_manager[setting], setting
    assert [entry["name"] for entry in generated_manager["http_filters"]] == [
        entry["name"] for entry in deploy_manager["http_filters"]
    ]
    assert bootstrap["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9901}
    generated_cluster = named(bootstrap["static_resources"]["clusters"], "extauthz")
    deploy_cluster = named(deploy["static_resources"]["clusters"], "extauthz")
    assert generated_cluster["health_checks"] == deploy_cluster["health_checks"]


def test_pieces_pasted_into_deploy_bootstrap(tmp_path: Path) -> None:
    # A user with a working Envoy configuration replaces its ext_authz parts with the pieces.
    pieces = generated_config("--namespace", "shop", "--label", "app=cart")
    bootstrap = load_deploy_bootstrap()
    manager = http_connection_manager(bootstrap)
    filters = manager["http_filters"]
    filters[[entry["name"] for entry in filters].index(EXT_AUTHZ_FILTER)] = pieces["http_filters"][0]
    for virtual_host in manager["route_config"]["virtual_hosts"]:
        for route in virtual_host["routes"]:
            route["typed_per_filter_config"] = pieces["typed_per_filter_config"]
    clusters = bootstrap["static_resources"]["clusters"]
    clusters[[cluster["name"] for cluster in clusters].index("extauthz")] = pieces["clusters"][0]
    bootstrap_path = tmp_path / "envoy.yaml"
    bootstrap_path.write_text(yaml.safe_dump(bootstrap, sort_keys=False), encoding="utf-8")

    validation = envoy_validate(bootstrap_path)

    assert validation.returncode == 0, validation.stdout + validation.stderr


def test_yaml_pieces_start_with_paste_instructions() -> None:
    result = run_envoy_config(*WORKLOAD_FLAGS)

    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("# Paste each piece into your Envoy configuration:")


def test_missing_dependency_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import envoy_data_plane` raise ImportError, as when it is not installed.
    monkeypatch.setitem(sys.modules, "envoy_data_plane", None)

    result = run_envoy_config(*WORKLOAD_FLAGS)

    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.strip() == "envoy-config needs the optional dependency: pip install 'extauthz[envoy]'"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--label", "app=httpbin"), "the following arguments are required: --namespace"),
        (("--namespace", ""), "invalid namespace ''"),
        (("--namespace", "demo", "--label", "app"), "invalid label 'app': write KEY=VALUE"),
        (("--namespace", "demo", "--label", "app=a", "--label", "app=b"), "--label app is given twice"),
        (("--namespace", "demo", "--extauthz-address", "9001"), "invalid address '9001': write HOST:PORT"),
        (("--namespace", "demo", "--upstream", "127.0.0.1:0"), "invalid port 0: expected 1 to 65535"),
        (("--namespace", "demo", "--listen-port", "70000"), "invalid port 70000: expected 0 to 65535"),
        (("--namespace", "demo", "--listen-address", "localhost"), "invalid IP address 'localhost'"),
        (("--namespace", "demo", "--timeout", "0s"), "invalid duration '0s': must be greater than 0"),
        (("--namespace", "demo", "--timeout", "1m"), "invalid duration '1m'"),
        (("--namespace", "demo", "--max-concurrent-streams", "0"), "invalid stream limit 0"),
        (("--namespace", "demo", "--format", "toml"), "invalid choice: 'toml'"),
    ],
)
def test_invalid_flags_exit_2(argv: tuple[str, ...], message: str) -> None:
    result = run_envoy_config(*argv)

    assert result.exit_code == 2
    assert result.stdout == ""
    assert message in result.stderr


# --- Same decisions as deploy/envoy/envoy.yaml --------------------------------------------


@dataclass(frozen=True)
class DecisionCase:
    name: str
    path: str
    token: str  # "valid", "expired", "unknown-issuer" or "none"
    expected_status: int


DECISION_CASES = [
    DecisionCase("valid token", "/headers", "valid", 200),
    DecisionCase("valid token in query", "/anything?access_token={token}&size=2", "valid", 200),
    DecisionCase("expired token", "/headers", "expired", 401),
    DecisionCase("expired token on public path", "/public", "expired", 401),
    DecisionCase("unknown issuer", "/headers", "unknown-issuer", 401),
    DecisionCase("no token on protected path", "/headers", "none", 403),
    DecisionCase("deny path", "/admin/users", "valid", 403),
    DecisionCase("deny path after merged slashes", "//admin", "valid", 403),
    DecisionCase("deny path after dot segments", "/public/../admin", "valid", 403),
    DecisionCase("public path without token", "/public/status?verbose=1", "none", 200),
]


@pytest.fixture(scope="module")
def signing_key() -> SigningKey:
    return make_rsa_key("envoy-config-rsa")


@pytest.fixture(scope="module")
def jwks_server(signing_key: SigningKey) -> Iterator[LocalHttpServer]:
    with LocalHttpServer() as server:
        server.set_route(JWKS_PATH, body=jwks_document(signing_key))
        yield server


@pytest.fixture(scope="module")
def extauthz(tmp_path_factory: pytest.TempPathFactory, jwks_server: LocalHttpServer) -> Iterator[ExtauthzProcess]:
    policies_dir = tmp_path_factory.mktemp("envoy-config-policies")
    (policies_dir / "httpbin.yaml").write_text(policy_documents(jwks_server.url(JWKS_PATH)), encoding="utf-8")

    work_dir = tmp_path_factory.mktemp("envoy-config-extauthz")
    with ExtauthzProcess(policies_dir, work_dir=work_dir) as process:
        process.wait_serving(timeout=20)
        yield process


@pytest.fixture(scope="module")
def upstream() -> Iterator[EchoUpstream]:
    with EchoUpstream() as server:
        yield server


def generated_bootstrap(extauthz_port: int, upstream_port: int) -> str:
    result = run_envoy_config(
        *WORKLOAD_FLAGS,
        "--bootstrap",
        "--extauthz-address", f"127.0.0.1:{extauthz_port}",
        "--upstream", f"127.0.0.1:{upstream_port}",
        # Tests must not accept connections from other hosts.
        "--listen-address", "127.0.0.1",
        "--listen-port", "0",
        "--admin-port", "0",
    )
    assert result.exit_code == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def generated_envoy(
    tmp_path_factory: pytest.TempPathFactory, extauthz: ExtauthzProcess, upstream: EchoUpstream
) -> Iterator[EnvoyProcess]:
    bootstrap = generated_bootstrap(extauthz.port, upstream.port)
    with EnvoyProcess(bootstrap, work_dir=tmp_path_factory.mktemp("envoy-config-generated")) as process:
        yield process


@pytest.fixture(scope="module")
def deploy_envoy(
    tmp_path_factory: pytest.TempPathFactory, extauthz: ExtauthzProcess, upstream: EchoUpstream
) -> Iterator[EnvoyProcess]:
    bootstrap = bootstrap_for_test(
        extauthz_port=extauthz.port,
        upstream_port=upstream.port,
        context_extensions={"namespace": "demo", "label.app": "httpbin"},
    )
    with EnvoyProcess(bootstrap, work_dir=tmp_path_factory.mktemp("envoy-config-deploy")) as process:
        yield process


def token_for(case: DecisionCase, signing_key: SigningKey) -> str | None:
    if case.token == "valid":
        return sign_token(signing_key, standard_claims(ISSUER, subject="alice"))
    if case.token == "expired":
        return sign_token(signing_key, standard_claims(ISSUER, ttl_s=-600))
    if case.token == "unknown-issuer":
        return sign_token(signing_key, standard_claims("https://unknown-issuer.test"))
    return None


def comparable(result: HttpResult) -> dict[str, Any]:
    """Return the parts of a response that do not change from one request to the next."""
    headers = {name: result.headers.get(name) for name in COMPARED_RESPONSE_HEADERS}
    if result.status != 200:
        return {"status": result.status, "headers": headers, "body": result.text}
    # The upstream echo lists the request headers, and x-request-id is new on every request.
    echo = result.echo()
    echo["headers"] = {name: value for name, value in echo["headers"].items() if name not in PER_REQUEST_HEADERS}
    return {"status": result.status, "headers": headers, "echo": echo}


@pytest.mark.parametrize("case", DECISION_CASES, ids=[case.name for case in DECISION_CASES])
def test_same_decision_as_deploy_bootstrap(
    case: DecisionCase,
    generated_envoy: EnvoyProcess,
    deploy_envoy: EnvoyProcess,
    signing_key: SigningKey,
    upstream: EchoUpstream,
) -> None:
    token = token_for(case, signing_key)
    path = case.path.format(token=token)
    headers = bearer(token) if token is not None and "{token}" not in case.path else {}
    # Both Envoys see the same Host, so the upstream echo can be compared.
    headers["Host"] = "httpbin.demo"

    hits_before = upstream.total_hits()
    generated = send_request(generated_envoy.http_port, path, headers)
    deploy = send_request(deploy_envoy.http_port, path, headers)
    upstream_hits = upstream.total_hits() - hits_before

    assert generated.status == case.expected_status, generated.text
    assert deploy.status == case.expected_status, deploy.text
    assert comparable(generated) == comparable(deploy)
    assert upstream_hits == (2 if case.expected_status == 200 else 0)


def test_generated_envoy_health_checks_extauthz(generated_envoy: EnvoyProcess, extauthz: ExtauthzProcess) -> None:
    host_prefix = f"extauthz::127.0.0.1:{extauthz.port}::health_flags::"
    health_flags = ""
    clusters = ""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        _, clusters = generated_envoy.admin_get("/clusters")
        lines = [line for line in clusters.splitlines() if line.startswith(host_prefix)]
        health_flags = lines[0].removeprefix(host_prefix) if lines else ""
        if health_flags == "healthy":
            break
        time.sleep(0.2)

    assert health_flags == "healthy", clusters


def test_generated_bootstrap_unreachable_extauthz_gets_503(tmp_path: Path, upstream: EchoUpstream) -> None:
    # A socket that is bound but not listening refuses connections, and holding it
    # keeps any other process from taking the port during the test.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed_port:
        closed_port.bind(("127.0.0.1", 0))
        bootstrap = generated_bootstrap(closed_port.getsockname()[1], upstream.port)
        hits_before = upstream.total_hits()

        with EnvoyProcess(bootstrap, work_dir=tmp_path) as envoy_without_extauthz:
            result = send_request(envoy_without_extauthz.http_port, "/public")

    assert result.status == 503
    assert upstream.total_hits() == hits_before
