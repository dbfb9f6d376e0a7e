"""Build `envoy.service.auth.v3` CheckRequests the way Envoy's ext_authz filter does,
and send them to a running server.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2


def build_check_request(
    *,
    method: str = "GET",
    path: str = "/",
    host: str = "httpbin.demo",
    headers: Mapping[str, str] | None = None,
    namespace: str = "demo",
    labels: Mapping[str, str] | None = None,
    source_ip: str = "10.0.0.1",
    source_port: int = 50000,
) -> external_auth_pb2.CheckRequest:
    """Return a CheckRequest for an HTTP/1.1 request to the workload `namespace`/`labels`.

    The workload goes into `context_extensions` as "namespace" and "label.<key>", as
    the per-route settings in deploy/envoy/envoy.yaml send it. Like Envoy, the header
    map contains the pseudo-headers and lower-cased names.
    """
    request = external_auth_pb2.CheckRequest()
    attributes = request.attributes

    source = attributes.source.address.socket_address
    source.address = source_ip
    source.port_value = source_port
    destination = attributes.destination.address.socket_address
    destination.address = "127.0.0.1"
    destination.port_value = 8080

    http = attributes.request.http
    http.method = method
    http.path = path
    http.host = host
    http.scheme = "http"
    http.protocol = "HTTP/1.1"
    http.headers[":method"] = method
    http.headers[":path"] = path
    http.headers[":authority"] = host
    http.headers[":scheme"] = "http"
    for name, value in (headers or {}).items():
        http.headers[name.lower()] = value

    attributes.context_extensions["namespace"] = namespace
    for key, value in (labels if labels is not None else {"app": "httpbin"}).items():
        attributes.context_extensions[f"label.{key}"] = value
    return request


def send_check(
    address: str, request: external_auth_pb2.CheckRequest, timeout: float = 5.0
) -> external_auth_pb2.CheckResponse:
    """Call `envoy.service.auth.v3.Authorization/Check` at `address` and return the response."""
    with grpc.insecure_channel(address) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        return stub.Check(request, timeout=timeout)


def status_code_name(response: external_auth_pb2.CheckResponse) -> str:
    """Return the `google.rpc.Code` name of a decision: OK, PERMISSION_DENIED or UNAUTHENTICATED."""
    return code_pb2.Code.Name(response.status.code)
