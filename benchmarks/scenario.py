"""The benchmark workload: signing key, tokens, policies, JWKS server and the encoded Check.

Workload `bench`/`app=api` has a RequestAuthentication whose `jwksUri` points at a local
JWKS server and one ALLOW AuthorizationPolicy with `requestPrincipals`, `methods`,
`paths` and a `when` condition on the `groups` claim. The benchmark request
`GET /api/items/42` with a token from that issuer in group `bench-readers` is allowed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2

from benchmarks.loadgen import BenchmarkError, pinned
from tests.support.check_requests import build_check_request, send_check
from tests.support.http_servers import LocalHttpServer
from tests.support.keys import SigningKey, jwks_document, make_rsa_key, sign_token, standard_claims
from tests.support.processes import REPO_ROOT, EnvoyProcess, ExtauthzProcess

ISSUER = "https://issuer.bench.local"
AUDIENCE = "api.bench"
GROUP = "bench-readers"
NAMESPACE = "bench"
LABELS = {"app": "api"}
METHOD = "GET"
PATH = "/api/items/42"
HOST = "api.bench"
JWKS_PATH = "/jwks.json"
# The run takes minutes, so two hours of validity cannot expire during it.
TOKEN_TTL_S = 7200

AUTHORIZATION_CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"
HEALTH_CHECK_PATH = "/grpc.health.v1.Health/Check"


def policy_yaml(jwks_rule_field: str) -> str:
    """Return the RequestAuthentication and AuthorizationPolicy of workload bench/app=api.

    `jwks_rule_field` is the key line of the jwtRule, `jwksUri: ...` or `jwks: '...'`.
    """
    return textwrap.dedent(f"""\
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata:
          name: api-jwt
          namespace: {NAMESPACE}
        spec:
          selector:
            matchLabels:
              app: api
          jwtRules:
          - issuer: {ISSUER}
            audiences: ["{AUDIENCE}"]
            {jwks_rule_field}
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: api-readers
          namespace: {NAMESPACE}
        spec:
          selector:
            matchLabels:
              app: api
          action: ALLOW
          rules:
          - from:
            - source:
                requestPrincipals: ["{ISSUER}/*"]
            to:
            - operation:
                methods: ["{METHOD}"]
                paths: ["/api/*"]
            when:
            - key: request.auth.claims[groups]
              values: ["{GROUP}"]
        """)


def grpc_frame(message: bytes) -> bytes:
    """Prefix a serialized message with the gRPC frame header: no compression, big-endian length."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def check_request(token: str | None, *, path: str = PATH) -> external_auth_pb2.CheckRequest:
    """Return the CheckRequest that Envoy sends for the benchmark request."""
    headers = {"user-agent": "wrk", "accept": "*/*", "x-forwarded-proto": "http",
               "x-request-id": "6f1f8a52-1b2e-4bb4-9a38-2f4f0e0c6d1a"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    return build_check_request(method=METHOD, path=path, host=HOST, headers=headers, namespace=NAMESPACE,
                               labels=LABELS)


@dataclass
class Scenario:
    """Key, tokens and a running JWKS server; `close()` stops the server."""

    signing_key: SigningKey
    token: str
    token_without_group: str
    jwks_server: LocalHttpServer
    policies_dir: Path

    @property
    def jwks_url(self) -> str:
        return self.jwks_server.url(JWKS_PATH)

    def close(self) -> None:
        self.jwks_server.close()


def start_scenario(work_dir: Path) -> Scenario:
    """Generate the key and tokens, start the JWKS server and write the policy directory."""
    signing_key = make_rsa_key("bench-1")
    token = sign_token(signing_key, standard_claims(ISSUER, audiences=(AUDIENCE,), ttl_s=TOKEN_TTL_S,
                                                    groups=[GROUP, "staff"]))
    token_without_group = sign_token(signing_key, standard_claims(ISSUER, audiences=(AUDIENCE,),
                                                                  ttl_s=TOKEN_TTL_S, groups=["staff"]))
    jwks_server = LocalHttpServer()
    jwks_server.set_route(JWKS_PATH, body=jwks_document(signing_key))
    policies_dir = work_dir / "policies"
    policies_dir.mkdir(parents=True, exist_ok=True)
    (policies_dir / "api.yaml").write_text(policy_yaml(f"jwksUri: {jwks_server.url(JWKS_PATH)}"))
    return Scenario(signing_key, token, token_without_group, jwks_server, policies_dir)


# --- encoded requests and their expected responses ----------------------------------------


@dataclass(frozen=True)
class EncodedCall:
    """A gRPC request body for h2load and the length of the response frame it must get."""

    path: str
    body_file: Path
    response_frame_bytes: int


def encode_authorization_check(scenario: Scenario, address: str, work_dir: Path) -> EncodedCall:
    """Write the benchmark CheckRequest as a gRPC frame, after checking with grpcio that it is allowed.

    h2load only counts response bytes, so the allow response must have the same length
    every time and a denial another length. Both are checked here with real calls.
    """
    request = check_request(scenario.token)
    lengths = set()
    for _ in range(3):
        response = send_check(address, request)
        if response.status.code != 0:
            raise BenchmarkError(f"the benchmark CheckRequest was denied, not allowed: "
                                 f"{json.dumps(MessageToDict(response))}")
        lengths.add(len(grpc_frame(response.SerializeToString())))
    if len(lengths) != 1:
        raise BenchmarkError(f"allow responses to the same CheckRequest have lengths {sorted(lengths)}, so "
                             "h2load's byte count cannot tell them from denials")
    allow_length = lengths.pop()
    denial = send_check(address, check_request(scenario.token_without_group))
    if denial.status.code == 0 or len(grpc_frame(denial.SerializeToString())) == allow_length:
        raise BenchmarkError("a CheckRequest without the groups claim was allowed, or its denial is as long as "
                             f"the allow response ({allow_length} bytes): {json.dumps(MessageToDict(denial))}")
    body_file = work_dir / "check-request.bin"
    body_file.write_bytes(grpc_frame(request.SerializeToString()))
    return EncodedCall(AUTHORIZATION_CHECK_PATH, body_file, allow_length)


def encode_health_check(work_dir: Path) -> EncodedCall:
    """Write a `grpc.health.v1.Health/Check` request for service "" as a gRPC frame.

    NOTE: NOT_SERVING has the same length as SERVING, so the byte count under load only
    catches failed calls. The server reported SERVING before the load.
    """
    body_file = work_dir / "health-request.bin"
    body_file.write_bytes(grpc_frame(health_pb2.HealthCheckRequest(service="").SerializeToString()))
    response = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
    return EncodedCall(HEALTH_CHECK_PATH, body_file, len(grpc_frame(response.SerializeToString())))


# --- processes pinned to CPUs ---------------------------------------------------------------


class PinnedExtauthz(ExtauthzProcess):
    """`extauthz serve` pinned to `cpu_list` with taskset, and stopped when the benchmark process dies."""

    def __init__(self, cpu_list: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cpu_list = cpu_list

    def _spawn(self, args: list[str], env: dict[str, str] | None = None) -> None:
        super()._spawn(pinned(self.cpu_list, args), env)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def args(self) -> list[str]:
        assert self.process is not None
        return [str(arg) for arg in self.process.args]  # type: ignore[union-attr]


class QuietPinnedExtauthz(PinnedExtauthz):
    """`extauthz serve --log-level WARNING` on a fixed port.

    At WARNING the server logs no `listening on HOST:PORT` line, which ExtauthzProcess.start
    waits for, so this start returns at once and `wait_serving()` waits for the health status.
    """

    def __init__(self, cpu_list: str, policies_dir: Path, *extra_args: str, port: int, **kwargs: Any) -> None:
        super().__init__(cpu_list, policies_dir, *extra_args, "--log-level", "WARNING",
                         listen=f"127.0.0.1:{port}", **kwargs)

    def start(self, timeout: float = 20.0) -> QuietPinnedExtauthz:
        args = [sys.executable, "-m", "extauthz", "serve", "--policies", str(self.policies_dir),
                "--listen", self.listen, *self.extra_args]
        env = dict(os.environ)
        # Like ExtauthzProcess: the checkout may not be installed, so it is imported from source.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env.update(self.extra_env)
        self._spawn(args, env)
        host, port = self.listen.rsplit(":", 1)
        self.host, self.port = host, int(port)
        return self


class PinnedEnvoy(EnvoyProcess):
    """Envoy pinned like PinnedExtauthz; EnvoyProcess already runs it with `--concurrency 1`."""

    def __init__(self, cpu_list: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cpu_list = cpu_list

    def _spawn(self, args: list[str], env: dict[str, str] | None = None) -> None:
        super()._spawn(pinned(self.cpu_list, args), env)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def args(self) -> list[str]:
        assert self.process is not None
        return [str(arg) for arg in self.process.args]  # type: ignore[union-attr]

    def listener_ports(self) -> dict[str, int]:
        """Return the port of every listener, by listener name, from the admin interface."""
        status, body = self.admin_get("/listeners?format=json")
        if status != 200:
            raise BenchmarkError(f"Envoy admin /listeners returned HTTP {status}: {body}")
        ports = {}
        for listener in json.loads(body).get("listener_statuses", []):
            address = listener.get("local_address", {}).get("socket_address", {})
            ports[listener["name"]] = int(address.get("port_value", 0))
        return ports


def serve_flags() -> str:
    """Return the help text of `extauthz serve`, to learn which flags this checkout has."""
    completed = subprocess.run([sys.executable, "-m", "extauthz", "serve", "--help"], capture_output=True,
                               text=True, timeout=60, check=False, cwd=REPO_ROOT)
    return completed.stdout


def http_status(url: str, headers: dict[str, str], timeout_s: float = 5.0) -> int:
    """Send one GET with urllib and return the HTTP status, error statuses included."""
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - a local URL we built
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as error:
        error.read()
        return int(error.code)
