"""Compiled matchers for AuthorizationPolicy fields and `when` conditions.

Everything here is built once per policy revision, so evaluation does no parsing and no
regex compilation. Semantics follow Istio. A positive field matches when any value
matches a present attribute. A negative field (`notX`, `notValues`) matches when no value
matches, which includes an absent attribute.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from typing import Any

from extauthz.request import IpAddress, RequestContext

StringPredicate = Callable[[str], bool]


def _present(value: str) -> bool:
    return value != ""


def string_matcher(pattern: str, *, ignore_case: bool = False) -> StringPredicate:
    """Build Istio's string match: `*` present, `abc*` prefix, `*abc` suffix, else exact."""
    if ignore_case:
        pattern = pattern.lower()

        def fold(value: str) -> str:
            return value.lower()
    else:

        def fold(value: str) -> str:
            return value

    if pattern == "*":
        return _present
    if pattern.startswith("*"):
        suffix = pattern[1:]
        return lambda value: fold(value).endswith(suffix)
    if pattern.endswith("*"):
        prefix = pattern[:-1]
        return lambda value: fold(value).startswith(prefix)
    return lambda value: fold(value) == pattern


# RFC 3986 pchar, as Envoy's URI template matcher defines the `{*}` and `{**}` operators.
_PCHAR = r"A-Za-z0-9\-._~%!$&'()+,;:@="
TEMPLATE_OPERATOR = re.compile(r"\{\*\*?\}")


def is_path_template(pattern: str) -> bool:
    return "{*}" in pattern or "{**}" in pattern


def path_template_problem(pattern: str) -> str | None:
    """Return why a `{*}`/`{**}` path template is invalid, or None when it is valid."""
    seen_double = False
    for segment in pattern.split("/"):
        operators = TEMPLATE_OPERATOR.findall(segment)
        if operators:
            if len(operators) > 1 or segment not in ("{*}", "{**}"):
                return (f"segment {segment!r} mixes an operator with other characters; "
                        "an operator must be a whole segment")
            if seen_double:
                return "no operator may follow {**}"
            seen_double = segment == "{**}"
            continue
        if "*" in segment:
            return f"segment {segment!r} has a '*' outside an operator; use {{*}} or {{**}}"
        if "{" in segment or "}" in segment:
            return f"segment {segment!r} has a brace that is not {{*}} or {{**}}"
    return None


def path_template_matcher(pattern: str) -> StringPredicate:
    parts: list[str] = []
    for piece in re.split(r"(\{\*\*?\})", pattern):
        if piece == "{*}":
            parts.append(f"[{_PCHAR}]+")
        elif piece == "{**}":
            parts.append(f"[{_PCHAR}/]*")
        elif piece:
            parts.append(re.escape(piece))
    regex = re.compile("".join(parts))
    return lambda value: regex.fullmatch(value) is not None


def path_matcher(pattern: str) -> StringPredicate:
    if is_path_template(pattern):
        return path_template_matcher(pattern)
    return string_matcher(pattern)


def namespace_matcher(pattern: str) -> StringPredicate:
    """Match the namespace segment of a peer principal; every `*` is a wildcard here."""
    body = ".*".join(re.escape(part) for part in pattern.split("*"))
    regex = re.compile(f".*/ns/{body}/.*")
    return lambda principal: regex.fullmatch(principal) is not None


def service_account_matcher(value: str, policy_namespace: str) -> StringPredicate:
    namespace, _, account = value.rpartition("/")
    suffix = f"/ns/{namespace or policy_namespace}/sa/{account}"
    return lambda principal: principal.endswith(suffix)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(value: str) -> Network:
    """Parse an IP address or CIDR block; raises ValueError with the reason."""
    return ipaddress.ip_network(value.strip(), strict=False)


def ip_matcher(networks: Sequence[Network]) -> Callable[[IpAddress], bool]:
    def matches(address: IpAddress) -> bool:
        return any(address.version == net.version and address in net for net in networks)

    return matches


def request_principal_matcher(pattern: str) -> Callable[[tuple[str, str]], bool]:
    """Match a verified token's (iss, sub) pair the way Istio splits `iss/sub` values.

    The value is split at its last `/`; without a `/`, a leading `*` is a subject suffix
    and a trailing `*` an issuer prefix.
    """
    if pattern == "*":
        issuer_match: StringPredicate = _present
        subject_match: StringPredicate = _present
    elif "/" in pattern:
        issuer_pattern, subject_pattern = pattern.rsplit("/", 1)
        issuer_match = string_matcher(issuer_pattern)
        subject_match = string_matcher(subject_pattern)
    elif pattern.startswith("*"):
        issuer_match = _present
        subject_match = string_matcher(pattern)
    elif pattern.endswith("*"):
        issuer_match = string_matcher(pattern)
        subject_match = _present
    else:
        full = pattern
        return lambda pair: f"{pair[0]}/{pair[1]}" == full

    return lambda pair: issuer_match(pair[0]) and subject_match(pair[1])


# --- attribute getters -------------------------------------------------------------------

Getter = Callable[[RequestContext], Any]


def header_getter(name: str) -> Getter:
    lowered = name.lower()
    return lambda ctx: ctx.headers.get(lowered)


def inline_header_getter(name: str) -> Getter:
    """Return the comma-separated elements of a header, for `request.experimental.inline.headers`."""
    lowered = name.lower()

    def get(ctx: RequestContext) -> list[str] | None:
        value = ctx.headers.get(lowered)
        if value is None:
            return None
        return [element.strip() for element in value.split(",")]

    return get


def claim_getter(path: Sequence[str]) -> Getter:
    """Return the string values of a (nested) claim of the verified token.

    A string claim gives one value, or its words for space-delimited claims such as
    `scope`. A list gives its string elements. Numbers, booleans and objects give none.
    """
    names = tuple(path)

    def get(ctx: RequestContext) -> list[str] | None:
        token = ctx.token
        if token is None:
            return None
        value: Any = token.payload
        for name in names:
            if not isinstance(value, dict) or name not in value:
                return None
            value = value[name]
        if isinstance(value, str):
            if len(names) == 1 and names[0] in token.split_claims:
                return value.split()
            return [value]
        if isinstance(value, list):
            return [item for item in value if isinstance(item, str)]
        return []

    return get


def token_principal(ctx: RequestContext) -> tuple[str, str] | None:
    token = ctx.token
    if token is None or not token.issuer or not token.subject:
        return None
    return (token.issuer, token.subject)


def audiences(ctx: RequestContext) -> list[str] | None:
    return claim_getter(("aud",))(ctx)


def presenter(ctx: RequestContext) -> list[str] | None:
    return claim_getter(("azp",))(ctx)


# --- field checks --------------------------------------------------------------------------


def _any_value_matches(matchers: tuple[Callable[[Any], bool], ...], values: Sequence[Any]) -> bool:
    for value in values:
        for matcher in matchers:
            if matcher(value):
                return True
    return False


class FieldCheck:
    """One policy field or `when` condition, with its positive and negative values.

    `getter` returns the attribute (a value, a list of values, or None when absent).
    """

    __slots__ = ("name", "getter", "positive", "negative")

    def __init__(
        self,
        name: str,
        getter: Getter,
        positive: Sequence[Callable[[Any], bool]],
        negative: Sequence[Callable[[Any], bool]],
    ) -> None:
        self.name = name
        self.getter = getter
        self.positive = tuple(positive)
        self.negative = tuple(negative)

    def __call__(self, ctx: RequestContext) -> bool:
        # Plain loops: this runs for every field of every rule evaluated, and generator
        # expressions cost about twice as much here.
        value = self.getter(ctx)
        if value is None:
            values: Sequence[Any] = ()
        elif isinstance(value, list):
            values = value
        else:
            values = (value,)
        if self.positive and not _any_value_matches(self.positive, values):
            return False
        return not (self.negative and _any_value_matches(self.negative, values))

    def __repr__(self) -> str:
        return f"FieldCheck({self.name})"
