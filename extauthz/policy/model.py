"""Compiled, immutable forms of RequestAuthentication and AuthorizationPolicy."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from extauthz.policy.matchers import FieldCheck
from extauthz.request import RequestContext, Workload

GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"


@dataclass(frozen=True)
class PolicyRef:
    """The name and source location of a policy, for messages, logs and decision metadata."""

    kind: str
    namespace: str
    name: str
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class TargetRef:
    group: str
    kind: str
    name: str
    namespace: str


@dataclass(frozen=True)
class Scope:
    """The workloads a policy applies to: its namespace, selector and target references."""

    namespace: str
    match_labels: frozenset[tuple[str, str]] | None  # None: every workload of the namespace
    target_refs: tuple[TargetRef, ...] = ()

    def applies_to(self, workload: Workload, root_namespace: str) -> bool:
        if self.namespace != workload.namespace and self.namespace != root_namespace:
            return False
        if self.target_refs:
            # Istio ignores targetRef policies for sidecar workloads; a Gateway API gateway
            # is recognised by the gateway-name label its pods carry.
            gateway = dict(workload.labels).get(GATEWAY_NAME_LABEL)
            return gateway is not None and any(
                ref.kind == "Gateway" and ref.name == gateway and ref.namespace in ("", self.namespace)
                and self.namespace == workload.namespace
                for ref in self.target_refs
            )
        if self.match_labels is None:
            return True
        return self.match_labels <= workload.labels


class LocationKind(StrEnum):
    HEADER = "header"
    QUERY = "query"
    COOKIE = "cookie"


@dataclass(frozen=True)
class TokenLocation:
    kind: LocationKind
    name: str  # lower-case for headers
    prefix: str = ""

    def __str__(self) -> str:
        if self.kind is LocationKind.HEADER:
            return f"header {self.name}" + (f" (prefix {self.prefix!r})" if self.prefix else "")
        return f"{self.kind.value} {self.name}"


DEFAULT_LOCATIONS = (
    TokenLocation(LocationKind.HEADER, "authorization", "Bearer "),
    TokenLocation(LocationKind.QUERY, "access_token"),
)


class FailureMode(StrEnum):
    PERMISSIVE = "PERMISSIVE"
    STRICT = "STRICT"
    IGNORE = "IGNORE"


@dataclass(frozen=True)
class ClaimToHeader:
    header: str  # lower-case
    claim: tuple[str, ...]  # nested path, split on "."


@dataclass(frozen=True)
class JwtRule:
    """One `jwtRules` entry, with its key source resolved to a JWKS cache key."""

    policy: PolicyRef
    index: int
    issuer: str
    audiences: tuple[str, ...]  # normalized: no scheme, no trailing "/"
    key_source: str  # key of the JWKS cache: an inline set, a jwksUri, or OpenID discovery
    locations: tuple[TokenLocation, ...]
    forward_original_token: bool
    output_payload_to_header: str | None
    output_claim_to_headers: tuple[ClaimToHeader, ...]
    timeout_s: float | None
    split_claims: frozenset[str]
    failure_mode: FailureMode

    @property
    def output_headers(self) -> tuple[str, ...]:
        names = [c.header for c in self.output_claim_to_headers]
        if self.output_payload_to_header:
            names.append(self.output_payload_to_header)
        return tuple(names)


@dataclass(frozen=True)
class RequestAuthentication:
    ref: PolicyRef
    scope: Scope
    rules: tuple[JwtRule, ...]


class Action(StrEnum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"


@dataclass(frozen=True)
class Rule:
    """One `rules` entry: any `from` source, any `to` operation, and every `when` condition."""

    sources: tuple[tuple[FieldCheck, ...], ...]
    operations: tuple[tuple[FieldCheck, ...], ...]
    conditions: tuple[FieldCheck, ...]

    def matches(self, ctx: RequestContext) -> bool:
        if self.sources and not _any_clause_matches(self.sources, ctx):
            return False
        if self.operations and not _any_clause_matches(self.operations, ctx):
            return False
        return _all_match(self.conditions, ctx)

    def mismatch(self, ctx: RequestContext) -> str | None:
        """Describe the first part of the rule that does not match, or None when it matches."""
        if self.sources and not any(all(check(ctx) for check in source) for source in self.sources):
            return "from: " + _first_failures(ctx, self.sources, "source")
        if self.operations and not any(all(check(ctx) for check in op) for op in self.operations):
            return "to: " + _first_failures(ctx, self.operations, "operation")
        for index, check in enumerate(self.conditions):
            if not check(ctx):
                return f"when[{index}]: {check.name} did not match"
        return None


def _all_match(checks: tuple[FieldCheck, ...], ctx: RequestContext) -> bool:
    for check in checks:
        if not check(ctx):
            return False
    return True


def _any_clause_matches(clauses: tuple[tuple[FieldCheck, ...], ...], ctx: RequestContext) -> bool:
    for clause in clauses:
        if _all_match(clause, ctx):
            return True
    return False


def _first_failures(ctx: RequestContext, clauses: tuple[tuple[FieldCheck, ...], ...], kind: str) -> str:
    parts = []
    for index, clause in enumerate(clauses):
        failed = next(check.name for check in clause if not check(ctx))
        parts.append(f"{kind} {index} {failed}")
    return "no " + kind + " matched (" + "; ".join(parts) + " did not match)"


@dataclass(frozen=True)
class AuthorizationPolicy:
    ref: PolicyRef
    scope: Scope
    action: Action
    rules: tuple[Rule, ...]
    dry_run: bool = False

    def first_match(self, ctx: RequestContext) -> int | None:
        """Return the index of the first matching rule, or None."""
        for index, rule in enumerate(self.rules):
            if rule.matches(ctx):
                return index
        return None


@dataclass(frozen=True)
class InlineJwks:
    """A `jwks` value of a rule, kept as text and parsed by the key cache."""

    key_source: str
    text: str
    origin: str


@dataclass(frozen=True)
class RemoteJwks:
    """A key source fetched over HTTP: a `jwksUri`, or OpenID discovery from the issuer."""

    key_source: str
    url: str
    discovery: bool
    timeout_s: float | None  # None: the server default


@dataclass(frozen=True)
class PolicySet:
    """A complete, validated revision of the policy directory."""

    revision: str
    request_authentications: tuple[RequestAuthentication, ...] = ()
    authorization_policies: tuple[AuthorizationPolicy, ...] = ()
    inline_jwks: tuple[InlineJwks, ...] = ()
    remote_jwks: tuple[RemoteJwks, ...] = ()
    files: tuple[str, ...] = ()
    warnings: tuple[str, ...] = field(default=())
