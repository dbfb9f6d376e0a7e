"""The attributes of one HTTP request that policies are evaluated against.

Pure data: the gRPC servicer fills it from a CheckRequest, `extauthz explain` and tests fill it
directly. Attribute names follow Istio's authorization conditions.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Workload:
    """The workload a request is for: its namespace and labels."""

    namespace: str
    labels: frozenset[tuple[str, str]] = frozenset()

    @classmethod
    def of(cls, namespace: str, labels: dict[str, str] | None = None) -> Workload:
        return cls(namespace, frozenset((labels or {}).items()))

    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass(frozen=True)
class VerifiedToken:
    """A JWT whose signature, time and audience checks passed."""

    payload: dict[str, Any]
    payload_segment: str
    issuer: str | None
    subject: str | None
    split_claims: frozenset[str]  # top-level claims split on spaces for matching

    @property
    def principal(self) -> str | None:
        if self.issuer and self.subject:
            return f"{self.issuer}/{self.subject}"
        return None


@dataclass
class RequestContext:
    """One request as Istio's `source.*`, `destination.*`, `request.*` attributes see it."""

    method: str = "GET"
    path: str = "/"  # normalized, without query string and fragment
    raw_path: str = "/"  # as received, with the query string
    query: str = ""
    host: str = ""
    scheme: str = "http"
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names, repeats joined with ","
    source_principal: str | None = None  # without the spiffe:// scheme
    source_ip: IpAddress | None = None
    remote_ip: IpAddress | None = None
    destination_ip: IpAddress | None = None
    destination_port: int | None = None
    sni: str | None = None
    token: VerifiedToken | None = None  # set by authentication

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


@functools.lru_cache(maxsize=4096)  # peers and proxies repeat, so most Checks hit the cache
def parse_ip(text: str | None) -> IpAddress | None:
    """Parse an IP address, returning None for an empty or invalid value."""
    if not text:
        return None
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


class InvalidPathError(ValueError):
    """A request path that Envoy would reject with 400."""


_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")


def _decode_unreserved(path: str) -> str:
    if "%" not in path:
        return path
    out = []
    i = 0
    while i < len(path):
        char = path[i]
        if char == "%" and i + 2 < len(path) and path[i + 1] in _HEX and path[i + 2] in _HEX:
            decoded = chr(int(path[i + 1:i + 3], 16))
            if decoded in _UNRESERVED:
                out.append(decoded)
            else:
                out.append(path[i:i + 3].upper())
            i += 3
            continue
        out.append(char)
        i += 1
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4, applied to an absolute path."""
    output: list[str] = []
    segments = path.split("/")
    for index, segment in enumerate(segments[1:], start=1):
        last = index == len(segments) - 1
        if segment == ".":
            if last:
                output.append("")
            continue
        if segment == "..":
            if output:
                output.pop()
            if last:
                output.append("")
            continue
        output.append(segment)
    return "/" + "/".join(output)


def split_path(raw_path: str) -> tuple[str, str]:
    """Return the normalized path (without query and fragment) and the query string.

    Applies Envoy's default normalization, which Istio relies on: percent-decoded
    unreserved characters, backslashes as slashes, dot segments removed. Envoy normally
    does this before calling ext_authz, so on its requests this changes nothing; it
    matters when a caller sends raw paths. `%2F` stays encoded, and `%00` raises InvalidPathError.
    """
    path, _, query = raw_path.partition("?")
    path = path.partition("#")[0]
    query = query.partition("#")[0]
    if "%00" in path:
        raise InvalidPathError("path contains %00")
    if not path.startswith("/"):
        path = "/" + path
    path = _decode_unreserved(path).replace("\\", "/")
    if "." in path:
        path = _remove_dot_segments(path)
    return path, query
