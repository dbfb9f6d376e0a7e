"""Turn the entries of tests/cases/istio_cases.yaml into policy files, JWTs and CheckRequests.

The table's format is described at the top of the YAML file. This module only builds
inputs and reads responses, and the assertions live in tests/test_istio_cases.py.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2

from extauthz.jwks import HttpFetcher
from tests.support.http_servers import LocalHttpServer
from tests.support.keys import (
    SigningKey,
    jwks_document,
    make_ec_key,
    make_rsa_key,
    sign_token,
    unsigned_token,
)

CASES_FILE = Path(__file__).parent / "cases" / "istio_cases.yaml"
POLICY_FILE_NAME = "policies.yaml"

# Placeholder in `expected.upstream.headers_set` for the payload segment of the first token.
TOKEN_PAYLOAD = "<TOKEN_PAYLOAD>"

# Client port reported in every CheckRequest. No case matches on it.
SOURCE_PORT = 50000


@dataclass(frozen=True)
class CaseTable:
    """The parsed case file: shared defaults, fixture descriptions and the cases."""

    defaults: dict[str, Any]
    fixtures: dict[str, Any]
    cases: list[dict[str, Any]]


def load_case_table(path: Path = CASES_FILE) -> CaseTable:
    with path.open(encoding="utf-8") as case_file:
        document = yaml.safe_load(case_file)
    return CaseTable(document["defaults"], document["fixtures"], document["cases"])


# --- keys and the JWKS server ------------------------------------------------------------


def make_fixture_keys(fixtures: dict[str, Any]) -> dict[str, SigningKey]:
    """Generate every key named in `fixtures.keys`, with the key name as its `kid`."""
    keys: dict[str, SigningKey] = {}
    for name, description in fixtures["keys"].items():
        if description["kty"] == "RSA":
            keys[name] = make_rsa_key(name, description["alg"])
        elif description["kty"] == "EC":
            keys[name] = make_ec_key(name, description["alg"])
        else:
            raise ValueError(
                f"unsupported key type {description['kty']!r} for fixture key {name!r}: expected RSA or EC"
            )
    return keys


def local_route(url: str) -> str:
    """Return the path on the local server that stands for `url`: /<host>/<path>."""
    parts = urlsplit(url)
    return f"/{parts.hostname}{parts.path or '/'}"


def publish_fixture_endpoints(server: LocalHttpServer, fixtures: dict[str, Any], keys: dict[str, SigningKey]) -> None:
    """Serve each `fixtures.http_endpoints` entry under its local route."""
    for url, endpoint in fixtures["http_endpoints"].items():
        route = local_route(url)
        if "jwks" in endpoint:
            document = jwks_document(*(keys[name] for name in endpoint["jwks"]))
            server.set_route(route, body=document)
        elif "json" in endpoint:
            server.set_route(route, body=endpoint["json"])
        else:
            server.set_route(route, status=endpoint["status"], body=b"unavailable\n", content_type="text/plain")


def placeholder_values(fixtures: dict[str, Any], keys: dict[str, SigningKey]) -> dict[str, str]:
    """Return the JSON text that replaces each placeholder such as ${JWKS_K5}."""
    values: dict[str, str] = {}
    for placeholder, content in fixtures["placeholders"].items():
        values[placeholder] = json.dumps(jwks_document(*(keys[name] for name in content["jwks"])))
    return values


class HostRewritingFetcher(HttpFetcher):
    """HttpFetcher that sends every request to the local fixture server.

    `https://issuer-a.example.com/jwks.json` is fetched from
    `http://127.0.0.1:<port>/issuer-a.example.com/jwks.json`, so only name resolution
    is replaced. The HTTP exchange itself is the product's.
    """

    def __init__(self, server: LocalHttpServer) -> None:
        super().__init__()
        self._server = server
        self.requested_urls: list[str] = []

    def fetch(self, url: str, timeout: float, max_bytes: int) -> bytes:
        self.requested_urls.append(url)
        parts = urlsplit(url)
        local_url = self._server.url(local_route(url))
        if parts.query:
            local_url += "?" + parts.query
        return super().fetch(local_url, timeout, max_bytes)


# --- policies ------------------------------------------------------------------------------


def substitute_placeholders(value: Any, placeholders: dict[str, str]) -> Any:
    """Return a copy of `value` with every placeholder inside a string replaced."""
    if isinstance(value, str):
        for placeholder, text in placeholders.items():
            value = value.replace(placeholder, text)
        return value
    if isinstance(value, list):
        return [substitute_placeholders(item, placeholders) for item in value]
    if isinstance(value, dict):
        return {key: substitute_placeholders(item, placeholders) for key, item in value.items()}
    return value


def write_policies(case: dict[str, Any], directory: Path, placeholders: dict[str, str]) -> Path | None:
    """Write the case's policies as one multi-document YAML file and return its path.

    A case without policies leaves the directory empty and returns None.
    """
    if not case["policies"]:
        return None
    documents = substitute_placeholders(case["policies"], placeholders)
    path = directory / POLICY_FILE_NAME
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False), encoding="utf-8")
    return path


# --- tokens --------------------------------------------------------------------------------


def token_specs(case: dict[str, Any], defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the full description of each token the case sends (empty for `token: none`)."""
    entries = case["token"] if isinstance(case["token"], list) else [case["token"]]
    specs = []
    for entry in entries:
        if entry == "none":
            continue
        spec = copy.deepcopy(defaults["token"])
        spec.update(copy.deepcopy(entry))
        specs.append(spec)
    return specs


def token_claims(spec: dict[str, Any], now: int) -> dict[str, Any]:
    """Return the JWT claims of a token description, leaving out the null fields."""
    claims: dict[str, Any] = {}
    if spec["issuer"] is not None:
        claims["iss"] = spec["issuer"]
    if spec["subject"] is not None:
        claims["sub"] = spec["subject"]
    if spec["audiences"] is not None:
        claims["aud"] = spec["audiences"]
    for claim, offset_field in (
        ("iat", "iat_offset_s"),
        ("nbf", "nbf_offset_s"),
        ("exp", "exp_offset_s"),
    ):
        if spec[offset_field] is not None:
            claims[claim] = now + spec[offset_field]
    claims.update(spec["extra_claims"])
    return claims


def encode_token(spec: dict[str, Any], keys: dict[str, SigningKey], now: int) -> str:
    """Build the token text that a client would send for one token description."""
    variant = spec["variant"]
    if variant == "malformed":
        return spec["raw"]

    claims = token_claims(spec, now)
    if variant == "valid":
        return sign_token(keys[spec["signing_key"]], claims, kid=spec["kid"], alg=spec["alg"])
    if variant == "invalid-signature":
        # The header names a published key, but the unpublished rogue key signs.
        return sign_token(keys["rogue"], claims, kid=spec["kid"], alg=spec["alg"])
    if variant == "alg-none":
        header: dict[str, Any] = {"alg": spec["alg"], "typ": "JWT"}
        if spec["kid"] is not None:
            header["kid"] = spec["kid"]
        return unsigned_token(claims, header, spec["signature_segment"])
    raise ValueError(f"unknown token variant {variant!r}: expected valid, invalid-signature, malformed or alg-none")


# --- requests ------------------------------------------------------------------------------


@dataclass
class CaseRequest:
    """One HTTP request of a case, with tokens already placed."""

    method: str
    path: str
    host: str
    scheme: str
    headers: list[tuple[str, str]]  # lower-case names, one entry per value of a repeated header
    source_principal: str | None
    source_ip: str
    remote_ip: str
    destination_ip: str
    destination_port: int
    sni: str | None
    header_form: str  # "headers" (joined map) or "header_map" (repeated raw entries)

    def header_names(self) -> set[str]:
        return {name for name, _ in self.headers}


def _placeholder(index: int) -> str:
    return "<TOKEN>" if index == 0 else f"<TOKEN{index + 1}>"


def build_request(
    case: dict[str, Any], defaults: dict[str, Any], specs: list[dict[str, Any]], tokens: list[str]
) -> CaseRequest:
    """Merge the case's request with the defaults and put each token at its placement."""
    fields = copy.deepcopy(defaults["request"])
    fields.update(copy.deepcopy(case.get("request", {})))

    headers: list[tuple[str, str]] = []
    for name, value in fields["headers"].items():
        values = value if isinstance(value, list) else [value]
        headers.extend((name.lower(), str(item)) for item in values)
    path: str = fields["path"]

    for index, (spec, token) in enumerate(zip(specs, tokens, strict=True)):
        placeholder = _placeholder(index)
        placement = spec["placement"]
        location = placement["in"]
        if location == "header":
            prefix = placement.get("prefix") or ""
            headers.append((placement["name"].lower(), prefix + token))
        elif location == "query":
            if placeholder not in path:
                separator = "&" if "?" in path else "?"
                path = f"{path}{separator}{placement['name']}={placeholder}"
        elif location == "cookie":
            if not any(placeholder in value for _, value in headers):
                headers.append(("cookie", f"{placement['name']}={placeholder}"))
        else:
            raise ValueError(f"unknown token placement {location!r}: expected header, query or cookie")
        path = path.replace(placeholder, token)
        headers = [(name, value.replace(placeholder, token)) for name, value in headers]

    # The service reads the original client address from the rightmost x-forwarded-for entry.
    if fields["remote_ip"] != fields["source_ip"] and "x-forwarded-for" not in {n for n, _ in headers}:
        headers.append(("x-forwarded-for", fields["remote_ip"]))

    return CaseRequest(
        method=fields["method"],
        path=path,
        host=fields["host"],
        scheme=fields["scheme"],
        headers=headers,
        source_principal=fields["source_principal"],
        source_ip=fields["source_ip"],
        remote_ip=fields["remote_ip"],
        destination_ip=fields["destination_ip"],
        destination_port=fields["destination_port"],
        sni=fields["sni"],
        header_form=fields.get("header_form", "headers"),
    )


def envoy_headers(request: CaseRequest) -> list[tuple[str, str]]:
    """Return the headers Envoy reports: pseudo-headers, x-forwarded-proto and the client's."""
    headers = [
        (":authority", request.host),
        (":method", request.method),
        (":path", request.path),
        (":scheme", request.scheme),
    ]
    if "x-forwarded-proto" not in request.header_names():
        headers.append(("x-forwarded-proto", request.scheme))
    headers.extend(request.headers)
    return headers


def build_check_request(request: CaseRequest, workload: dict[str, Any]) -> external_auth_pb2.CheckRequest:
    """Build the CheckRequest that Envoy's ext_authz filter would send for `request`."""
    check = external_auth_pb2.CheckRequest()
    attributes = check.attributes

    http = attributes.request.http
    http.method = request.method
    http.path = request.path
    http.host = request.host
    http.scheme = request.scheme
    http.protocol = "HTTP/1.1"

    headers = envoy_headers(request)
    if request.header_form == "header_map":
        # Envoy's encode_raw_headers form: one entry per header line, the map left empty.
        for name, value in headers:
            http.header_map.headers.add(key=name, raw_value=value.encode("utf-8"))
    elif request.header_form == "headers":
        for name, value in headers:
            if name in http.headers:
                http.headers[name] = http.headers[name] + "," + value
            else:
                http.headers[name] = value
    else:
        raise ValueError(f"unknown header_form {request.header_form!r}: expected headers or header_map")

    source = attributes.source
    source.address.socket_address.address = request.source_ip
    source.address.socket_address.port_value = SOURCE_PORT
    source.principal = f"spiffe://{request.source_principal}" if request.source_principal else ""

    destination = attributes.destination.address.socket_address
    destination.address = request.destination_ip
    destination.port_value = request.destination_port

    if request.sni:
        attributes.tls_session.sni = request.sni

    attributes.context_extensions["namespace"] = workload["namespace"]
    for label, value in workload["labels"].items():
        attributes.context_extensions[f"label.{label}"] = value
    return check


def workload_of(case: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    workload = copy.deepcopy(defaults["workload"])
    workload.update(copy.deepcopy(case.get("workload", {})))
    return workload


def prepare_request(
    case: dict[str, Any], defaults: dict[str, Any], keys: dict[str, SigningKey]
) -> tuple[CaseRequest, list[str], external_auth_pb2.CheckRequest]:
    """Sign the case's tokens against the current clock and build its CheckRequest."""
    specs = token_specs(case, defaults)
    now = int(time.time())
    tokens = [encode_token(spec, keys, now) for spec in specs]
    request = build_request(case, defaults, specs, tokens)
    return request, tokens, build_check_request(request, workload_of(case, defaults))


# --- reading responses ---------------------------------------------------------------------


def header_values(options: Any, name: str) -> list[str]:
    """Return the values of every HeaderValueOption named `name` (case-insensitive)."""
    key = name.lower()
    values = []
    for option in options:
        if option.header.key.lower() == key:
            values.append(option.header.value or option.header.raw_value.decode("utf-8"))
    return values


def overwrites(option: base_pb2.HeaderValueOption) -> bool:
    """Return whether Envoy replaces an existing request header with this option.

    Envoy honours the deprecated `append` flag when it is set, and otherwise uses
    `append_action`, whose default APPEND_IF_EXISTS_OR_ADD would add a second value
    (source/extensions/filters/common/ext_authz/ext_authz_grpc_impl.cc, getAppendAction).
    """
    if option.HasField("append"):
        return not option.append.value
    return option.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def remove_query_parameters(path: str, names: list[str]) -> str:
    """Remove the named query parameters from `path` as Envoy applies query_parameters_to_remove."""
    if "?" not in path or not names:
        return path
    base, query = path.split("?", 1)
    removed = set(names)
    kept_pairs = [pair for pair in query.split("&") if unquote(pair.split("=", 1)[0]) not in removed]
    return f"{base}?{'&'.join(kept_pairs)}" if kept_pairs else base


def token_payload(token: str) -> str:
    return token.split(".")[1]
