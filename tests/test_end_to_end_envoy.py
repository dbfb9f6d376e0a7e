"""End-to-end tests: a client talks to a real Envoy that runs deploy/envoy/envoy.yaml
and sends a Check for every request to a real extauthz process.

The JWKS comes from a local HTTP server and the upstream echoes what Envoy forwarded,
so each test checks both the client's response and the upstream request.

Policies of workload demo/app=httpbin:
- RequestAuthentication: issuer https://issuer.test, the JWKS of `signing_key`, and
  the `sub` claim copied to the x-user header.
- DENY: /admin and everything below it, for everyone.
- ALLOW: any request with a valid JWT, and /public and below without one.
"""

from __future__ import annotations

import http.client
import json
import socket
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import pytest

from tests.support.envoy_bootstrap import bootstrap_for_test
from tests.support.http_servers import EchoUpstream, LocalHttpServer
from tests.support.keys import (
    SigningKey,
    jwks_document,
    make_rsa_key,
    sign_token,
    standard_claims,
)
from tests.support.processes import EnvoyProcess, ExtauthzProcess

ISSUER = "https://issuer.test"
JWKS_PATH = "/jwks.json"


def policy_documents(jwks_url: str) -> str:
    return textwrap.dedent(
        f"""\
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata:
          name: httpbin-jwt
          namespace: demo
        spec:
          selector:
            matchLabels:
              app: httpbin
          jwtRules:
          - issuer: {ISSUER}
            jwksUri: {jwks_url}
            outputClaimToHeaders:
            - header: x-user
              claim: sub
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: deny-admin
          namespace: demo
        spec:
          selector:
            matchLabels:
              app: httpbin
          action: DENY
          rules:
          - to:
            - operation:
                paths: ["/admin", "/admin/*"]
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: require-jwt
          namespace: demo
        spec:
          selector:
            matchLabels:
              app: httpbin
          action: ALLOW
          rules:
          - from:
            - source:
                requestPrincipals: ["*"]
          - to:
            - operation:
                paths: ["/public", "/public/*"]
        """
    )


@dataclass(frozen=True)
class HttpResult:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def echo(self) -> dict[str, Any]:
        """Return the upstream request that EchoUpstream described in the body."""
        return json.loads(self.body)


def send_request(port: int, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> HttpResult:
    """Send one request to 127.0.0.1:`port` with `path` exactly as given (no normalization)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        body = response.read()
        response_headers = {name.lower(): value for name, value in response.getheaders()}
        return HttpResult(response.status, response_headers, body)
    finally:
        connection.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def signing_key() -> SigningKey:
    return make_rsa_key("e2e-rsa")


@pytest.fixture(scope="module")
def jwks_server(signing_key: SigningKey) -> Iterator[LocalHttpServer]:
    with LocalHttpServer() as server:
        server.set_route(JWKS_PATH, body=jwks_document(signing_key))
        yield server


@pytest.fixture(scope="module")
def extauthz(tmp_path_factory: pytest.TempPathFactory, jwks_server: LocalHttpServer) -> Iterator[ExtauthzProcess]:
    policies_dir = tmp_path_factory.mktemp("e2e-policies")
    (policies_dir / "httpbin.yaml").write_text(policy_documents(jwks_server.url(JWKS_PATH)), encoding="utf-8")

    work_dir = tmp_path_factory.mktemp("e2e-extauthz")
    with ExtauthzProcess(policies_dir, "--log-level", "debug", work_dir=work_dir) as process:
        process.wait_serving(timeout=20)
        yield process


@pytest.fixture(scope="module")
def upstream() -> Iterator[EchoUpstream]:
    with EchoUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def envoy(
    tmp_path_factory: pytest.TempPathFactory,
    extauthz: ExtauthzProcess,
    upstream: EchoUpstream,
) -> Iterator[EnvoyProcess]:
    bootstrap = bootstrap_for_test(
        extauthz_port=extauthz.port,
        upstream_port=upstream.port,
        context_extensions={"namespace": "demo", "label.app": "httpbin"},
    )
    work_dir = tmp_path_factory.mktemp("e2e-envoy")
    with EnvoyProcess(bootstrap, work_dir=work_dir) as process:
        yield process


@pytest.fixture()
def valid_token(signing_key: SigningKey) -> str:
    return sign_token(signing_key, standard_claims(ISSUER, subject="alice"))


def test_valid_token_reaches_upstream(envoy: EnvoyProcess, valid_token: str) -> None:
    result = send_request(envoy.http_port, "/headers", bearer(valid_token))

    assert result.status == 200, result.text
    forwarded = result.echo()
    assert forwarded["path"] == "/headers"
    assert forwarded["headers"].get("x-user") == "alice"
    assert "authorization" not in forwarded["headers"]


def test_spoofed_claim_header_replaced(envoy: EnvoyProcess, valid_token: str) -> None:
    headers = {**bearer(valid_token), "x-user": "mallory"}

    result = send_request(envoy.http_port, "/headers", headers)

    assert result.status == 200, result.text
    assert result.echo()["headers"].get("x-user") == "alice"


def test_expired_token_gets_401(envoy: EnvoyProcess, signing_key: SigningKey) -> None:
    expired = sign_token(signing_key, standard_claims(ISSUER, ttl_s=-600))

    result = send_request(envoy.http_port, "/headers", bearer(expired))

    assert result.status == 401
    assert result.text == "Jwt is expired"
    challenge = result.headers.get("www-authenticate", "")
    assert challenge.startswith('Bearer realm="'), challenge
    assert 'error="invalid_token"' in challenge


def test_expired_token_rejected_on_public_path(
    envoy: EnvoyProcess, signing_key: SigningKey, upstream: EchoUpstream
) -> None:
    # A token that fails validation is rejected even where no token is required.
    expired = sign_token(signing_key, standard_claims(ISSUER, ttl_s=-600))
    hits_before = upstream.total_hits()

    result = send_request(envoy.http_port, "/public", bearer(expired))

    assert result.status == 401
    assert result.text == "Jwt is expired"
    assert upstream.total_hits() == hits_before


def test_unknown_issuer_gets_401(envoy: EnvoyProcess, signing_key: SigningKey) -> None:
    token = sign_token(signing_key, standard_claims("https://unknown-issuer.test"))

    result = send_request(envoy.http_port, "/headers", bearer(token))

    assert result.status == 401
    assert result.text == "Jwt issuer is not configured"
    assert 'error="invalid_token"' in result.headers.get("www-authenticate", "")


def test_missing_token_gets_403(envoy: EnvoyProcess, upstream: EchoUpstream) -> None:
    hits_before = upstream.total_hits()

    result = send_request(envoy.http_port, "/headers")

    assert result.status == 403
    assert result.text == "RBAC: access denied"
    assert upstream.total_hits() == hits_before


def test_public_path_without_token(envoy: EnvoyProcess) -> None:
    result = send_request(envoy.http_port, "/public/status?verbose=1")

    assert result.status == 200, result.text
    forwarded = result.echo()
    assert forwarded["path"] == "/public/status?verbose=1"
    assert "x-user" not in forwarded["headers"]


@pytest.mark.parametrize("path", ["/admin", "/admin/users", "//admin", "/public/../admin"])
def test_deny_path_gets_403(envoy: EnvoyProcess, upstream: EchoUpstream, valid_token: str, path: str) -> None:
    # "//admin" and "/public/../admin" reach the DENY rule on "/admin" only because
    # the deploy bootstrap normalizes paths before the ext_authz filter sends them.
    hits_before = upstream.total_hits()

    result = send_request(envoy.http_port, path, bearer(valid_token))

    assert result.status == 403
    assert result.text == "RBAC: access denied"
    assert upstream.total_hits() == hits_before


def test_query_token_removed_upstream(envoy: EnvoyProcess, valid_token: str) -> None:
    path = f"/anything?color=blue&access_token={quote(valid_token)}&size=2"

    result = send_request(envoy.http_port, path)

    assert result.status == 200, result.text
    forwarded = result.echo()
    forwarded_url = urlsplit(forwarded["path"])
    assert forwarded_url.path == "/anything"
    assert "access_token" not in forwarded["path"]
    assert parse_qsl(forwarded_url.query) == [("color", "blue"), ("size", "2")]
    assert forwarded["headers"].get("x-user") == "alice"


def test_jwks_fetched_from_jwks_uri(envoy: EnvoyProcess, jwks_server: LocalHttpServer, valid_token: str) -> None:
    result = send_request(envoy.http_port, "/headers", bearer(valid_token))

    assert result.status == 200, result.text
    assert jwks_server.hits(JWKS_PATH) >= 1


def test_envoy_health_checks_extauthz(envoy: EnvoyProcess, extauthz: ExtauthzProcess) -> None:
    # The deploy bootstrap health-checks the extauthz cluster over gRPC. Its first
    # check runs when Envoy starts, so the host is normally healthy at once.
    host_prefix = f"extauthz::127.0.0.1:{extauthz.port}::health_flags::"
    health_flags = ""
    clusters = ""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        _, clusters = envoy.admin_get("/clusters")
        lines = [line for line in clusters.splitlines() if line.startswith(host_prefix)]
        health_flags = lines[0].removeprefix(host_prefix) if lines else ""
        if health_flags == "healthy":
            break
        time.sleep(0.2)

    assert health_flags == "healthy", clusters


def test_unreachable_extauthz_gets_503(tmp_path: Path, upstream: EchoUpstream, valid_token: str) -> None:
    # A socket that is bound but not listening refuses connections, and holding it
    # keeps any other process from taking the port during the test.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed_port:
        closed_port.bind(("127.0.0.1", 0))
        bootstrap = bootstrap_for_test(extauthz_port=closed_port.getsockname()[1], upstream_port=upstream.port)
        hits_before = upstream.total_hits()

        with EnvoyProcess(bootstrap, work_dir=tmp_path) as envoy_without_extauthz:
            result = send_request(envoy_without_extauthz.http_port, "/headers", bearer(valid_token))

    assert result.status == 503
    assert upstream.total_hits() == hits_before
