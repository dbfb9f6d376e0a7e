"""The policy engine: authentication by RequestAuthentication, then AuthorizationPolicy.

Pure Python with no gRPC import, so it can be tested and benchmarked alone. The order is
Istio's: select the policies of the workload, verify tokens (a bad token is rejected
before any AuthorizationPolicy runs), then DENY policies, then ALLOW policies.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from extauthz import metrics
from extauthz.decision import Decision, denied, token_denied
from extauthz.jwks import JwksCache, KeySet
from extauthz.policy.model import (
    Action,
    AuthorizationPolicy,
    FailureMode,
    JwtRule,
    LocationKind,
    PolicySet,
    TokenLocation,
)
from extauthz.request import RequestContext, VerifiedToken, Workload
from extauthz.tokens import (
    CLOCK_SKEW_S,
    ParsedJwt,
    TokenError,
    check_audience,
    check_time,
    parse_jwt,
    verify_signature,
)

logger = logging.getLogger("extauthz.engine")

WORKLOAD_CACHE_SIZE = 4096
TOKEN_CACHE_SIZE = 10_000
TOKEN_CACHE_MAX_TTL_S = 300.0  # for tokens without exp
_TOKEN = re.compile(r"[A-Za-z0-9\-_.=+/]+")
_LOCATION_ORDER = {LocationKind.HEADER: 0, LocationKind.QUERY: 1, LocationKind.COOKIE: 2}


@dataclass(frozen=True)
class WorkloadPolicies:
    """Everything of one revision that applies to one workload."""

    jwt_rules: tuple[JwtRule, ...] = ()
    # token locations in extraction order (headers, query parameters, cookies), each with
    # the rules that declared it
    locations: tuple[tuple[TokenLocation, tuple[JwtRule, ...]], ...] = ()
    output_headers: frozenset[str] = frozenset()
    deny: tuple[AuthorizationPolicy, ...] = ()
    allow: tuple[AuthorizationPolicy, ...] = ()
    audit: tuple[AuthorizationPolicy, ...] = ()
    dry_run: tuple[AuthorizationPolicy, ...] = ()
    request_authentications: tuple[str, ...] = ()


def _select(policy_set: PolicySet, workload: Workload, root_namespace: str) -> WorkloadPolicies:
    rules: list[JwtRule] = []
    request_authentications = []
    for ra in policy_set.request_authentications:
        if ra.scope.applies_to(workload, root_namespace):
            rules.extend(ra.rules)
            request_authentications.append(str(ra.ref))
    by_location: dict[TokenLocation, list[JwtRule]] = {}
    for rule in rules:
        for location in rule.locations:
            by_location.setdefault(location, []).append(rule)
    locations = sorted(by_location.items(), key=lambda item: _LOCATION_ORDER[item[0].kind])
    output_headers = frozenset(header for rule in rules for header in rule.output_headers)

    buckets: dict[str, list[AuthorizationPolicy]] = {"DENY": [], "ALLOW": [], "AUDIT": [], "DRY": []}
    for ap in policy_set.authorization_policies:
        if not ap.scope.applies_to(workload, root_namespace):
            continue
        buckets["DRY" if ap.dry_run else ap.action.value].append(ap)
    return WorkloadPolicies(
        jwt_rules=tuple(rules),
        locations=tuple((loc, tuple(rs)) for loc, rs in locations),
        output_headers=output_headers,
        deny=tuple(buckets["DENY"]),
        allow=tuple(buckets["ALLOW"]),
        audit=tuple(buckets["AUDIT"]),
        dry_run=tuple(buckets["DRY"]),
        request_authentications=tuple(request_authentications),
    )


@dataclass(frozen=True)
class CachedToken:
    """A token that verified, valid while its key set is current and until `expires_at`."""

    rule: JwtRule
    token: VerifiedToken
    keyset: KeySet
    expires_at: float  # wall-clock seconds: exp plus clock skew


class PolicySnapshot:
    """One immutable policy revision, with the applicable policies cached per workload.

    It also contains the verified-token cache, so a new revision starts with an empty one.
    """

    def __init__(self, policy_set: PolicySet, root_namespace: str) -> None:
        self.policy_set = policy_set
        self.revision = policy_set.revision
        self.root_namespace = root_namespace
        self._by_workload: dict[Workload, WorkloadPolicies] = {}
        self._lock = threading.Lock()
        self.tokens: dict[tuple[TokenLocation, str], CachedToken] = {}

    def remember_token(self, key: tuple[TokenLocation, str], entry: CachedToken) -> None:
        with self._lock:
            while len(self.tokens) >= TOKEN_CACHE_SIZE:
                self.tokens.pop(next(iter(self.tokens)))  # the oldest entry goes first
            self.tokens[key] = entry

    def for_workload(self, workload: Workload) -> WorkloadPolicies:
        found = self._by_workload.get(workload)
        if found is not None:
            return found
        found = _select(self.policy_set, workload, self.root_namespace)
        if not (found.jwt_rules or found.deny or found.allow or found.audit or found.dry_run) and (
                self.policy_set.request_authentications or self.policy_set.authorization_policies):
            # Logged once per workload and revision: the selection is cached below.
            logger.warning("no policy of revision %s applies to workload %s %s, so its requests are allowed; "
                           "check the namespace and labels Envoy sends (context_extensions) or the "
                           "--workload-* flags", self.revision, workload.namespace, workload.label_dict())
        with self._lock:
            if len(self._by_workload) >= WORKLOAD_CACHE_SIZE:
                self._by_workload.clear()
            self._by_workload[workload] = found
        return found


@dataclass
class Authentication:
    """The result of authentication: the verified token and the request changes it causes."""

    token: VerifiedToken | None = None
    headers_to_set: list[tuple[str, str]] = field(default_factory=list)
    headers_to_remove: list[str] = field(default_factory=list)
    query_parameters_to_remove: list[str] = field(default_factory=list)


def extract_token(ctx: RequestContext, location: TokenLocation) -> str | None:
    """Return the token at one location, or None when the location has none."""
    if location.kind is LocationKind.HEADER:
        value = ctx.headers.get(location.name)
        if value is None:
            return None
        if not location.prefix:
            return value.strip() or None
        # Like Envoy: find the prefix anywhere, skip separators after it, and take the
        # run of token characters that follows. A header without the prefix has no token.
        position = value.find(location.prefix)
        if position < 0:
            return None
        match = _TOKEN.search(value, position + len(location.prefix))
        return match.group() if match else None
    if location.kind is LocationKind.QUERY:
        if not ctx.query:
            return None
        for name, value in parse_qsl(ctx.query, keep_blank_values=True):
            if name == location.name:
                return value or None
        return None
    cookie_header = ctx.headers.get("cookie")
    if not cookie_header:
        return None
    for part in cookie_header.replace(",", ";").split(";"):
        name, _, value = part.strip().partition("=")
        if name == location.name:
            return value.strip().strip('"') or None
    return None


def claim_header_value(value: object) -> str | None:
    """Format a claim for outputClaimToHeaders as Envoy does; None when it is not copied."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:f}"
    if isinstance(value, str) and value:
        return value
    return None


def _is_cors_preflight(ctx: RequestContext) -> bool:
    return (ctx.method == "OPTIONS" and bool(ctx.headers.get("origin"))
            and bool(ctx.headers.get("access-control-request-method")))


class Authorizer:
    """Decide requests against the active snapshot; reload swaps `snapshot` in one assignment."""

    def __init__(self, jwks: JwksCache, snapshot: PolicySnapshot | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.jwks = jwks
        self.snapshot = snapshot
        self._clock = clock
        self.token_cache_hits = 0

    def decide(self, ctx: RequestContext, workload: Workload, trace: list[str] | None = None) -> Decision:
        """Decide one request; with `trace`, append each step of the decision to it in words."""
        snapshot = self.snapshot  # one read: the whole Check uses one revision
        if snapshot is None:
            if trace is not None:
                trace.append("no policy revision is loaded, so every request is denied")
            return denied("policies_not_loaded")
        revision = snapshot.revision
        policies = snapshot.for_workload(workload)
        if trace is not None:
            trace.extend(describe_policies(workload, policies, revision))
        try:
            authentication = self.authenticate(ctx, policies, snapshot, trace)
        except TokenError as failure:
            if trace is not None:
                trace.append(f"token rejected: {failure.body} (reason {failure.reason}); "
                             "AuthorizationPolicies are not evaluated")
            return token_denied(failure, _realm(ctx), revision=revision)
        ctx.token = authentication.token
        principal = authentication.token.principal if authentication.token else None
        return self.authorize(ctx, policies, authentication, revision, principal, trace)

    # --- authentication -------------------------------------------------------------------

    def authenticate(self, ctx: RequestContext, policies: WorkloadPolicies, snapshot: PolicySnapshot,
                     trace: list[str] | None = None) -> Authentication:
        result = Authentication()
        if not policies.jwt_rules:
            if trace is not None:
                trace.append("no RequestAuthentication applies, so any token is ignored")
            return result  # without a RequestAuthentication the token is not looked at
        if _is_cors_preflight(ctx):
            if trace is not None:
                trace.append("CORS preflight: authentication is skipped")
            return result
        verified: list[tuple[TokenLocation, JwtRule, VerifiedToken]] = []
        # Every token found must verify: several tokens in one request are undefined in
        # Istio, and rejecting when any of them is bad is the fail-closed reading.
        for location, rules in policies.locations:
            text = extract_token(ctx, location)
            if text is None:
                continue
            if trace is not None:
                trace.append(f"token found in {location}")
            outcome = self._verify_cached(location, text, rules, snapshot)
            if outcome is not None:
                verified.append((location, outcome[0], outcome[1]))
                if trace is not None:
                    rule, token = outcome
                    trace.append(f"token verified by RequestAuthentication {rule.policy} jwtRules[{rule.index}] "
                                 f"(issuer {rule.issuer!r}); request principal {token.principal!r}")
            elif trace is not None:
                trace.append("token ignored: its rules have failureMode IGNORE")
        if trace is not None and not verified:
            trace.append("no token verified: the request is unauthenticated")
        if not verified and any(rule.failure_mode is FailureMode.STRICT for rule in policies.jwt_rules):
            raise TokenError("jwt_missing")

        set_headers: dict[str, str] = {}
        for location, rule, token in verified:
            if not rule.forward_original_token:
                if location.kind is LocationKind.HEADER:
                    result.headers_to_remove.append(location.name)
                elif location.kind is LocationKind.QUERY:
                    result.query_parameters_to_remove.append(location.name)
            if rule.output_payload_to_header:
                set_headers[rule.output_payload_to_header] = token.payload_segment
            for claim_header in rule.output_claim_to_headers:
                value: object = token.payload
                for name in claim_header.claim:
                    value = value.get(name) if isinstance(value, dict) else None
                formatted = claim_header_value(value)
                if formatted is not None:
                    set_headers.setdefault(claim_header.header, formatted)
        # Output headers a client sent are removed even without a token, so they cannot be
        # spoofed; the ones set here replace the client's value instead.
        if policies.output_headers:
            result.headers_to_remove.extend(sorted(policies.output_headers - set_headers.keys()))
        if set_headers:
            result.headers_to_set = sorted(set_headers.items())
        if verified:
            result.token = verified[0][2]
        return result

    def _verify_cached(self, location: TokenLocation, text: str, rules: tuple[JwtRule, ...],
                       snapshot: PolicySnapshot) -> tuple[JwtRule, VerifiedToken] | None:
        """Verify a token, skipping the signature check for a token verified before.

        A cached entry serves only while the key set it was verified with is the current
        one (a rotation or refetch drops it) and until the token's exp plus clock skew.
        """
        key = (location, text)
        cached = snapshot.tokens.get(key)
        if cached is not None:
            if self._clock() <= cached.expires_at and self.jwks.keyset(cached.rule.key_source) is cached.keyset:
                self.token_cache_hits += 1
                metrics.TOKEN_CACHE_HIT.inc()
                return cached.rule, cached.token
            snapshot.tokens.pop(key, None)
        metrics.TOKEN_CACHE_MISS.inc()
        outcome = self._verify(text, rules)
        if outcome is None:
            return None
        rule, token, keyset = outcome
        exp = token.payload.get("exp")
        expires_at = exp + CLOCK_SKEW_S if exp is not None else self._clock() + TOKEN_CACHE_MAX_TTL_S
        snapshot.remember_token(key, CachedToken(rule, token, keyset, expires_at))
        return rule, token

    def _verify(self, text: str, rules: tuple[JwtRule, ...]) -> tuple[JwtRule, VerifiedToken, KeySet] | None:
        """Verify one token against the rules of its location; None when ignored (failureMode IGNORE)."""
        ignore = all(rule.failure_mode is FailureMode.IGNORE for rule in rules)
        try:
            jwt = parse_jwt(text)
            candidates = [rule for rule in rules if not rule.issuer or rule.issuer == jwt.issuer]
            if not candidates:
                raise TokenError("jwt_issuer_not_configured")
            first_failure: TokenError | None = None
            for rule in candidates:
                try:
                    keyset = self._verify_for_rule(jwt, rule)
                except TokenError as failure:
                    first_failure = first_failure or failure
                    continue
                token = VerifiedToken(jwt.payload, jwt.payload_segment, jwt.issuer, jwt.subject, rule.split_claims)
                return rule, token, keyset
            assert first_failure is not None
            raise first_failure
        except TokenError:
            if ignore:
                return None
            raise

    def _verify_for_rule(self, jwt: ParsedJwt, rule: JwtRule) -> KeySet:
        check_time(jwt, self._clock())
        check_audience(jwt, rule.audiences)
        keyset = self.jwks.keyset(rule.key_source)
        if keyset is None:
            raise TokenError("jwks_fetch_failed" if self.jwks.is_remote(rule.key_source) else "jwks_no_valid_key")
        if jwt.kid and jwt.kid not in keyset.kids and self.jwks.is_remote(rule.key_source):
            keyset = self.jwks.refresh_for_unknown_kid(rule.key_source, keyset) or keyset
        if not keyset.keys:
            raise TokenError("jwks_no_valid_key")
        verify_signature(jwt, keyset.keys)
        return keyset

    # --- authorization --------------------------------------------------------------------

    def authorize(self, ctx: RequestContext, policies: WorkloadPolicies, authentication: Authentication,
                  revision: str, principal: str | None, trace: list[str] | None = None) -> Decision:
        shadow = tuple(_shadow_results(ctx, policies.dry_run)) if policies.dry_run else ()
        audited = bool(policies.audit) and any(policy.first_match(ctx) is not None for policy in policies.audit)
        if trace is not None:
            trace.extend(f"dry-run: {result}" for result in shadow)
            if audited:
                trace.append("an AUDIT policy matched: the request is marked for auditing")
        for policy in policies.deny:
            index = policy.first_match(ctx)
            if trace is not None:
                trace.append(_describe_match(ctx, policy, index))
            if index is not None:
                return denied("denied_by_policy", revision=revision, policy=str(policy.ref), rule=index,
                              principal=principal, shadow=shadow, audited=audited)
        matched: tuple[str, int] | None = None
        for policy in policies.allow:
            index = policy.first_match(ctx)
            if trace is not None:
                trace.append(_describe_match(ctx, policy, index))
            if index is not None:
                matched = (str(policy.ref), index)
                break
        if trace is not None and not policies.allow:
            trace.append("no ALLOW policy applies, so the request is allowed")
        if policies.allow and matched is None:
            if trace is not None:
                trace.append("ALLOW policies apply but none matched: denied")
            return denied("no_allow_policy_matched", revision=revision, principal=principal, shadow=shadow,
                          audited=audited)
        return Decision(
            allowed=True,
            reason="allowed_by_policy" if matched else "allowed_no_allow_policy",
            grpc_code=0,
            http_status=200,
            headers_to_set=tuple(authentication.headers_to_set),
            headers_to_remove=tuple(authentication.headers_to_remove),
            query_parameters_to_remove=tuple(authentication.query_parameters_to_remove),
            principal=principal,
            policy=matched[0] if matched else None,
            rule=matched[1] if matched else None,
            revision=revision,
            audited=audited,
            shadow=shadow,
        )


def describe_policies(workload: Workload, policies: WorkloadPolicies, revision: str) -> list[str]:
    """Describe which policies of a revision apply to a workload."""
    labels = ", ".join(f"{k}={v}" for k, v in sorted(workload.labels)) or "no labels"
    lines = [f"revision {revision}; workload namespace {workload.namespace!r} ({labels})"]
    lines.append("RequestAuthentication: " + (", ".join(policies.request_authentications) or "none applies"))
    for action, bucket in (("DENY", policies.deny), ("ALLOW", policies.allow), ("AUDIT", policies.audit),
                           ("dry-run", policies.dry_run)):
        if bucket:
            lines.append(f"{action} policies: " + ", ".join(str(p.ref) for p in bucket))
    if not (policies.deny or policies.allow or policies.audit or policies.dry_run):
        lines.append("AuthorizationPolicy: none applies")
    return lines


def _describe_match(ctx: RequestContext, policy: AuthorizationPolicy, index: int | None) -> str:
    if index is not None:
        return f"{policy.action.value} {policy.ref} rules[{index}] matched"
    if not policy.rules:
        return f"{policy.action.value} {policy.ref} has no rules, so it matches nothing"
    reasons = "; ".join(f"rules[{i}] {rule.mismatch(ctx)}" for i, rule in enumerate(policy.rules))
    return f"{policy.action.value} {policy.ref} did not match: {reasons}"


def _shadow_results(ctx: RequestContext, dry_run: tuple[AuthorizationPolicy, ...]) -> list[str]:
    """Describe what dry-run policies would decide, in the words of Istio's shadow logs."""
    results = []
    allow_policies = [p for p in dry_run if p.action is Action.ALLOW]
    for policy in dry_run:
        index = policy.first_match(ctx)
        label = f"ns[{policy.ref.namespace}]-policy[{policy.ref.name}]-rule[{index}]"
        if policy.action is Action.DENY and index is not None:
            results.append(f"denied by {label}")
        elif policy.action is Action.ALLOW and index is not None:
            results.append(f"allowed by {label}")
    if allow_policies and not any(r.startswith("allowed") for r in results):
        results.append("denied: no dry-run ALLOW policy matched")
    return results


def _realm(ctx: RequestContext) -> str:
    # The query string is left out of the realm because it may carry the token itself.
    scheme = ctx.headers.get("x-forwarded-proto") or ctx.scheme or "http"
    return f"{scheme}://{ctx.host}{ctx.path}"[:256]
