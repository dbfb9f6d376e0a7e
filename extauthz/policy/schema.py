"""Validate Istio policy documents and compile them into the immutable model.

Validation follows Istio's own (istio/istio `pkg/config/validation`): anything Istio
rejects is an error here, where Istio only warns this warns. Unknown fields are errors,
since a misspelled field silently ignored can turn a deny into an allow.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from extauthz.errors import Problem
from extauthz.policy import matchers
from extauthz.policy.matchers import FieldCheck
from extauthz.policy.model import (
    DEFAULT_LOCATIONS,
    Action,
    AuthorizationPolicy,
    ClaimToHeader,
    FailureMode,
    InlineJwks,
    JwtRule,
    LocationKind,
    PolicyRef,
    RemoteJwks,
    RequestAuthentication,
    Rule,
    Scope,
    TargetRef,
    TokenLocation,
)
from extauthz.policy.source import Document, LocatedList, LocatedMap
from extauthz.request import RequestContext
from extauthz.tokens import normalize_audience

API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
KINDS = ("RequestAuthentication", "AuthorizationPolicy")
ALWAYS_SPLIT_CLAIMS = frozenset({"scope", "permission"})
DRY_RUN_ANNOTATION = "istio.io/dry-run"

_TOP_FIELDS = {"apiVersion", "kind", "metadata", "spec", "status"}
_METADATA_FIELDS = {
    "name", "namespace", "labels", "annotations", "uid", "resourceVersion", "generation",
    "creationTimestamp", "managedFields", "ownerReferences", "finalizers", "selfLink",
    "generateName", "deletionTimestamp", "deletionGracePeriodSeconds",
}
_RA_FIELDS = {"selector", "targetRef", "targetRefs", "jwtRules"}
_AP_FIELDS = {"selector", "targetRef", "targetRefs", "action", "provider", "rules"}
_JWT_RULE_FIELDS = {
    "issuer", "audiences", "jwksUri", "jwks_uri", "jwks", "fromHeaders", "fromParams",
    "fromCookies", "outputPayloadToHeader", "forwardOriginalToken", "outputClaimToHeaders",
    "timeout", "spaceDelimitedClaims", "failureMode",
}
_SOURCE_FIELDS = (
    "principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals", "namespaces",
    "notNamespaces", "ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks",
    "serviceAccounts", "notServiceAccounts",
)
_OPERATION_FIELDS = ("hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths")
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_TRUE_VALUES = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE_VALUES = {"0", "f", "F", "FALSE", "false", "False"}


@dataclass
class CompileResult:
    request_authentications: list[RequestAuthentication] = field(default_factory=list)
    authorization_policies: list[AuthorizationPolicy] = field(default_factory=list)
    inline_jwks: dict[str, InlineJwks] = field(default_factory=dict)
    remote_jwks: dict[str, RemoteJwks] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


class _Context:
    """The file and policy being compiled, to locate every problem."""

    def __init__(self, file: str, result: CompileResult) -> None:
        self.file = file
        self.result = result
        self.label = ""

    def error(self, line: int, path: str, message: str) -> None:
        self._add(line, path, message, "error")

    def warning(self, line: int, path: str, message: str) -> None:
        self._add(line, path, message, "warning")

    def _add(self, line: int, path: str, message: str, severity: str) -> None:
        parts = [p for p in (self.label, path) if p]
        text = ": ".join(parts + [message])
        self.result.problems.append(Problem(self.file, line, text, severity))


def _line(container: Any, key: str | int, default: int) -> int:
    if isinstance(container, LocatedMap) and isinstance(key, str):
        return container.line_of(key)
    if isinstance(container, LocatedList) and isinstance(key, int):
        return container.line_of(key)
    return default


def _type_name(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    return type(value).__name__


def _mapping(ctx: _Context, value: Any, path: str, line: int, allowed: Iterable[str]) -> LocatedMap | None:
    if value is None:
        empty = LocatedMap()
        empty.line, empty.key_lines = line, {}
        return empty
    if not isinstance(value, dict):
        ctx.error(line, path, f"expected a mapping, got {_type_name(value)}")
        return None
    allowed_set = set(allowed)
    for key in value:
        if key not in allowed_set:
            known = ", ".join(sorted(allowed_set))
            ctx.error(_line(value, key, line), f"{path}.{key}" if path else key,
                      f"unknown field {key!r}; known fields here: {known}")
    return value  # type: ignore[return-value]


def _string(ctx: _Context, value: Any, path: str, line: int) -> str | None:
    if not isinstance(value, str):
        ctx.error(line, path, f"expected a string, got {_type_name(value)}")
        return None
    return value


def _string_list(ctx: _Context, parent: LocatedMap, key: str, path: str) -> list[str] | None:
    """Read an optional list of non-empty strings; None when absent or invalid."""
    if key not in parent:
        return None
    value = parent[key]
    line = parent.line_of(key)
    field_path = f"{path}.{key}"
    if value is None:
        return None
    if not isinstance(value, list):
        ctx.error(line, field_path, f"expected a list of strings, got {_type_name(value)}")
        return None
    result: list[str] = []
    for index, item in enumerate(value):
        item_line = _line(value, index, line)
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            ctx.error(item_line, f"{field_path}[{index}]", f"expected a string, got {_type_name(item)}")
            continue
        text = str(item)
        if text == "":
            ctx.error(item_line, f"{field_path}[{index}]", "empty string; remove the entry or give a value")
            continue
        result.append(text)
    return result


# --- document level --------------------------------------------------------------------------


def compile_documents(file: str, documents: list[Document], result: CompileResult) -> None:
    """Compile every document of one file into `result`, recording problems there."""
    ctx = _Context(file, result)
    for document in documents:
        _compile_object(ctx, document.value, document.line, "")


def _compile_object(ctx: _Context, value: Any, line: int, path: str) -> None:
    ctx.label = ""
    if not isinstance(value, dict):
        ctx.error(line, path, f"expected a Kubernetes object (a mapping), got {_type_name(value)}")
        return
    kind = value.get("kind")
    if kind == "List":
        items = value.get("items")
        if not isinstance(items, list):
            ctx.error(_line(value, "items", line), f"{path}items", "a List needs an 'items' list")
            return
        for index, item in enumerate(items):
            _compile_object(ctx, item, _line(items, index, line), f"{path}items[{index}].")
        return

    api_version = value.get("apiVersion")
    if kind not in KINDS:
        ctx.error(_line(value, "kind", line), f"{path}kind",
                  f"unsupported kind {kind!r}; expected one of {', '.join(KINDS)} (keep other resources "
                  "out of the policy directory)")
        return
    _mapping(ctx, value, path.rstrip("."), line, _TOP_FIELDS)
    if api_version not in API_VERSIONS:
        ctx.error(_line(value, "apiVersion", line), f"{path}apiVersion",
                  f"unsupported apiVersion {api_version!r}; expected {' or '.join(API_VERSIONS)}")
        return
    ref = _compile_metadata(ctx, value, kind, line, path)
    if ref is None:
        return

    ctx.label = f"{kind}/{ref.namespace}/{ref.name}"
    spec = _mapping(ctx, value.get("spec"), "spec", _line(value, "spec", line),
                    _RA_FIELDS if kind == "RequestAuthentication" else _AP_FIELDS)
    if spec is None:
        return
    scope = _compile_scope(ctx, spec, ref)
    if kind == "RequestAuthentication":
        _compile_request_authentication(ctx, spec, ref, scope)
    else:
        dry_run = _dry_run(ctx, value, line)
        _compile_authorization_policy(ctx, spec, ref, scope, dry_run)


def _compile_metadata(ctx: _Context, value: dict[str, Any], kind: str, line: int, path: str) -> PolicyRef | None:
    metadata = _mapping(ctx, value.get("metadata"), f"{path}metadata", _line(value, "metadata", line),
                        _METADATA_FIELDS)
    if metadata is None:
        return None
    name = metadata.get("name")
    namespace = metadata.get("namespace")
    ok = True
    if not isinstance(name, str) or not name:
        ctx.error(metadata.line_of("name"), f"{path}metadata.name", f"{kind} needs a non-empty metadata.name")
        ok = False
    if not isinstance(namespace, str) or not namespace:
        ctx.error(metadata.line_of("namespace"), f"{path}metadata.namespace",
                  f"{kind} {name!r} needs metadata.namespace: the namespace decides which workloads it "
                  "applies to, so it is never guessed")
        ok = False
    if not ok or not isinstance(name, str) or not isinstance(namespace, str):
        return None
    return PolicyRef(kind, namespace, name, ctx.file, line)


def _dry_run(ctx: _Context, value: dict[str, Any], line: int) -> bool:
    metadata = value.get("metadata") or {}
    annotations = metadata.get("annotations") if isinstance(metadata, dict) else None
    if not isinstance(annotations, dict) or DRY_RUN_ANNOTATION not in annotations:
        return False
    raw = str(annotations[DRY_RUN_ANNOTATION])
    if raw in _TRUE_VALUES:
        return True
    if raw not in _FALSE_VALUES:
        # Istio logs and enforces the policy when the value is not a boolean.
        ctx.warning(_line(annotations, DRY_RUN_ANNOTATION, line), f"metadata.annotations[{DRY_RUN_ANNOTATION}]",
                    f"value {raw!r} is not a boolean, so the policy is enforced; use \"true\" or \"false\"")
    return False


def _compile_scope(ctx: _Context, spec: LocatedMap, ref: PolicyRef) -> Scope:
    present = [key for key in ("selector", "targetRef", "targetRefs") if spec.get(key) is not None]
    if len(present) > 1:
        ctx.error(spec.line_of(present[1]), "spec",
                  f"{' and '.join(present)} are set together; set only one of selector, targetRef, targetRefs")
    match_labels: frozenset[tuple[str, str]] | None = None
    selector = spec.get("selector")
    if selector is not None:
        selector = _mapping(ctx, selector, "spec.selector", spec.line_of("selector"), {"matchLabels"})
        labels = selector.get("matchLabels") if selector is not None else None
        if selector is not None and not labels:
            ctx.warning(spec.line_of("selector"), "spec.selector",
                        "empty selector selects every workload in the namespace; remove it or add matchLabels")
        if selector is not None and isinstance(labels, dict) and labels:
            pairs = []
            for key, label_value in labels.items():
                label_line = _line(labels, key, selector.line)
                if not key or "*" in key:
                    ctx.error(label_line, f"spec.selector.matchLabels[{key}]",
                              "label keys must be non-empty and cannot contain wildcards")
                elif not isinstance(label_value, str) or "*" in label_value:
                    ctx.error(label_line, f"spec.selector.matchLabels[{key}]",
                              f"label value {label_value!r} must be a string without wildcards")
                else:
                    pairs.append((key, label_value))
            match_labels = frozenset(pairs)
        elif labels is not None and not isinstance(labels, dict):
            ctx.error(selector.line_of("matchLabels") if selector is not None else 0,
                      "spec.selector.matchLabels", f"expected a mapping, got {_type_name(labels)}")
    refs: list[TargetRef] = []
    raw_refs: list[tuple[Any, str, int]] = []
    if spec.get("targetRef") is not None:
        raw_refs.append((spec["targetRef"], "spec.targetRef", spec.line_of("targetRef")))
    if spec.get("targetRefs") is not None:
        items = spec["targetRefs"]
        if not isinstance(items, list):
            ctx.error(spec.line_of("targetRefs"), "spec.targetRefs", f"expected a list, got {_type_name(items)}")
        else:
            for index, item in enumerate(items):
                raw_refs.append((item, f"spec.targetRefs[{index}]", _line(items, index, spec.line_of("targetRefs"))))
    for raw, path, line in raw_refs:
        target = _mapping(ctx, raw, path, line, {"group", "kind", "name", "namespace"})
        if target is None:
            continue
        if not target.get("kind") or not target.get("name"):
            ctx.error(line, path, "a target reference needs kind and name")
            continue
        refs.append(TargetRef(str(target.get("group", "")), str(target["kind"]), str(target["name"]),
                              str(target.get("namespace", ""))))
    return Scope(ref.namespace, match_labels, tuple(refs))


# --- RequestAuthentication -------------------------------------------------------------------


def _parse_duration(text: Any) -> float | None:
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    match = _DURATION.match(str(text)) if isinstance(text, str) else None
    if not match:
        return None
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def _compile_request_authentication(ctx: _Context, spec: LocatedMap, ref: PolicyRef, scope: Scope) -> None:
    rules_value = spec.get("jwtRules")
    rules: list[JwtRule] = []
    if rules_value is not None and not isinstance(rules_value, list):
        ctx.error(spec.line_of("jwtRules"), "spec.jwtRules", f"expected a list, got {_type_name(rules_value)}")
        return
    for index, raw in enumerate(rules_value or []):
        line = _line(rules_value, index, spec.line_of("jwtRules"))
        rule = _compile_jwt_rule(ctx, raw, ref, index, line)
        if rule is not None:
            rules.append(rule)
    ctx.result.request_authentications.append(RequestAuthentication(ref, scope, tuple(rules)))


def _compile_jwt_rule(ctx: _Context, raw: Any, ref: PolicyRef, index: int, line: int) -> JwtRule | None:
    path = f"spec.jwtRules[{index}]"
    rule = _mapping(ctx, raw, path, line, _JWT_RULE_FIELDS)
    if rule is None:
        return None
    errors_before = len([p for p in ctx.result.problems if p.severity == "error"])

    issuer = rule.get("issuer", "")
    if not isinstance(issuer, str):
        ctx.error(rule.line_of("issuer"), f"{path}.issuer", f"expected a string, got {_type_name(issuer)}")
        issuer = ""
    if "jwksUri" in rule and "jwks_uri" in rule:
        ctx.error(rule.line_of("jwks_uri"), f"{path}.jwks_uri", "jwks_uri is the legacy name of jwksUri; set only one")
    uri_key = "jwksUri" if "jwksUri" in rule else "jwks_uri"
    jwks_uri = rule.get(uri_key) or ""
    if not isinstance(jwks_uri, str):
        ctx.error(rule.line_of(uri_key), f"{path}.{uri_key}", f"expected a string, got {_type_name(jwks_uri)}")
        jwks_uri = ""
    if not issuer and not jwks_uri:
        ctx.error(line, path, "a JWT rule needs an issuer or a jwksUri")
    if jwks_uri:
        parts = urlsplit(jwks_uri)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            ctx.error(rule.line_of(uri_key), f"{path}.{uri_key}",
                      f"{jwks_uri!r} is not an http:// or https:// URL")

    audiences = _string_list(ctx, rule, "audiences", path) or []

    timeout_s: float | None = None  # None: the server's --jwks-fetch-timeout
    if "timeout" in rule:
        parsed = _parse_duration(rule["timeout"])
        if parsed is None or parsed <= 0:
            ctx.error(rule.line_of("timeout"), f"{path}.timeout",
                      f"invalid duration {rule['timeout']!r}; write it like 5s, 1.5s or 500ms")
        else:
            timeout_s = parsed

    jwks_text = rule.get("jwks")
    key_source = ""
    if jwks_text is not None and jwks_text != "":
        if not isinstance(jwks_text, str):
            ctx.error(rule.line_of("jwks"), f"{path}.jwks",
                      "expected the JWKS as a JSON string (use a YAML block scalar |)")
        else:
            problem = _jwks_problem(jwks_text)
            if problem:
                ctx.error(rule.line_of("jwks"), f"{path}.jwks", problem)
            else:
                # Inline sets are keyed by content, so identical sets share one parsed copy.
                key_source = "inline:" + jwks_text.strip()
                ctx.result.inline_jwks.setdefault(key_source, InlineJwks(key_source, jwks_text, f"{ref}:{path}"))
    elif jwks_uri:
        key_source = jwks_uri
        known = ctx.result.remote_jwks.get(key_source)
        if known is None or (timeout_s or 0) > (known.timeout_s or 0):
            ctx.result.remote_jwks[key_source] = RemoteJwks(key_source, jwks_uri, False, timeout_s)
    elif issuer:
        discovery_url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        parts = urlsplit(discovery_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            ctx.error(line, path, f"no jwks or jwksUri, and issuer {issuer!r} is not a URL usable for OpenID "
                      "discovery; set jwksUri or jwks")
        else:
            key_source = "discovery:" + discovery_url
            ctx.result.remote_jwks.setdefault(key_source, RemoteJwks(key_source, discovery_url, True, timeout_s))

    locations = _compile_locations(ctx, rule, path)

    forward = rule.get("forwardOriginalToken", False)
    if not isinstance(forward, bool):
        ctx.error(rule.line_of("forwardOriginalToken"), f"{path}.forwardOriginalToken",
                  f"expected true or false, got {forward!r}")
        forward = False

    payload_header = rule.get("outputPayloadToHeader") or None
    if payload_header is not None:
        if not isinstance(payload_header, str) or not _HEADER_NAME.match(payload_header):
            ctx.error(rule.line_of("outputPayloadToHeader"), f"{path}.outputPayloadToHeader",
                      f"{payload_header!r} is not a valid HTTP header name")
            payload_header = None
        else:
            payload_header = payload_header.lower()

    claim_headers = _compile_claim_headers(ctx, rule, path, payload_header)

    split = set(ALWAYS_SPLIT_CLAIMS)
    split.update(_string_list(ctx, rule, "spaceDelimitedClaims", path) or [])

    failure_mode = FailureMode.PERMISSIVE
    if "failureMode" in rule:
        raw_mode = rule["failureMode"]
        try:
            failure_mode = FailureMode(raw_mode)
        except ValueError:
            ctx.error(rule.line_of("failureMode"), f"{path}.failureMode",
                      f"unknown failureMode {raw_mode!r}; expected PERMISSIVE, STRICT or IGNORE")

    errors_after = len([p for p in ctx.result.problems if p.severity == "error"])
    if errors_after != errors_before:
        return None
    return JwtRule(
        policy=ref,
        index=index,
        issuer=issuer,
        audiences=tuple(normalize_audience(a) for a in audiences),
        key_source=key_source,
        locations=locations,
        forward_original_token=forward,
        output_payload_to_header=payload_header,
        output_claim_to_headers=claim_headers,
        timeout_s=timeout_s,
        split_claims=frozenset(split),
        failure_mode=failure_mode,
    )


def _jwks_problem(text: str) -> str | None:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"inline jwks is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        return 'inline jwks must be a JSON object with a "keys" list'
    return None


def _compile_locations(ctx: _Context, rule: LocatedMap, path: str) -> tuple[TokenLocation, ...]:
    locations: list[TokenLocation] = []
    headers = rule.get("fromHeaders")
    if headers is not None:
        if not isinstance(headers, list):
            ctx.error(rule.line_of("fromHeaders"), f"{path}.fromHeaders", f"expected a list, got {_type_name(headers)}")
        else:
            for index, raw in enumerate(headers):
                item_path = f"{path}.fromHeaders[{index}]"
                item = _mapping(ctx, raw, item_path, _line(headers, index, rule.line_of("fromHeaders")),
                                {"name", "prefix"})
                if item is None:
                    continue
                name = item.get("name")
                if not isinstance(name, str) or not _HEADER_NAME.match(name):
                    ctx.error(item.line_of("name"), f"{item_path}.name", f"{name!r} is not a valid HTTP header name")
                    continue
                prefix = item.get("prefix", "")
                if not isinstance(prefix, str):
                    ctx.error(item.line_of("prefix"), f"{item_path}.prefix", "expected a string")
                    continue
                locations.append(TokenLocation(LocationKind.HEADER, name.lower(), prefix))
    for param in _string_list(ctx, rule, "fromParams", path) or []:
        locations.append(TokenLocation(LocationKind.QUERY, param))
    for cookie in _string_list(ctx, rule, "fromCookies", path) or []:
        locations.append(TokenLocation(LocationKind.COOKIE, cookie))
    if not locations and not any(key in rule for key in ("fromHeaders", "fromParams", "fromCookies")):
        return DEFAULT_LOCATIONS
    return tuple(locations)


def _compile_claim_headers(
    ctx: _Context, rule: LocatedMap, path: str, payload_header: str | None
) -> tuple[ClaimToHeader, ...]:
    raw = rule.get("outputClaimToHeaders")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        ctx.error(rule.line_of("outputClaimToHeaders"), f"{path}.outputClaimToHeaders",
                  f"expected a list, got {_type_name(raw)}")
        return ()
    result: list[ClaimToHeader] = []
    seen = {payload_header} if payload_header else set()
    for index, item in enumerate(raw):
        item_path = f"{path}.outputClaimToHeaders[{index}]"
        entry = _mapping(ctx, item, item_path, _line(raw, index, rule.line_of("outputClaimToHeaders")),
                         {"header", "claim"})
        if entry is None:
            continue
        header = entry.get("header")
        claim = entry.get("claim")
        if not isinstance(header, str) or not _HEADER_NAME.match(header):
            ctx.error(entry.line_of("header"), f"{item_path}.header", f"{header!r} is not a valid HTTP header name")
            continue
        if header.lower() in seen:
            ctx.error(entry.line_of("header"), f"{item_path}.header",
                      f"header {header!r} is already an output of this rule; each output header must be unique")
            continue
        if not isinstance(claim, str) or not claim:
            ctx.error(entry.line_of("claim"), f"{item_path}.claim", "needs a claim name (nested claims as a.b.c)")
            continue
        seen.add(header.lower())
        result.append(ClaimToHeader(header.lower(), tuple(claim.split("."))))
    return tuple(result)


# --- AuthorizationPolicy ---------------------------------------------------------------------


def _compile_authorization_policy(
    ctx: _Context, spec: LocatedMap, ref: PolicyRef, scope: Scope, dry_run: bool
) -> None:
    raw_action = spec.get("action", "ALLOW")
    action_line = spec.line_of("action")
    if raw_action == "CUSTOM":
        ctx.error(action_line, "spec.action",
                  "CUSTOM is not supported: extauthz is itself the external authorizer and cannot delegate "
                  "to another provider; use ALLOW, DENY or AUDIT")
        return
    try:
        action = Action(raw_action)
    except ValueError:
        ctx.error(action_line, "spec.action", f"unknown action {raw_action!r}; expected ALLOW, DENY or AUDIT")
        return
    if spec.get("provider") is not None:
        ctx.error(spec.line_of("provider"), "spec.provider",
                  f"provider is only allowed with action CUSTOM, not {action.value}")

    raw_rules = spec.get("rules")
    if raw_rules is not None and not isinstance(raw_rules, list):
        ctx.error(spec.line_of("rules"), "spec.rules", f"expected a list, got {_type_name(raw_rules)}")
        return
    if not raw_rules and action is Action.DENY:
        ctx.error(spec.line_of("rules") if "rules" in spec else spec.line, "spec.rules",
                  f"{action.value} without rules is meaningless, because it matches nothing; add rules "
                  "(rules: [{}] matches every request)")
        return
    errors_before = _error_count(ctx)
    rules = []
    for index, raw in enumerate(raw_rules or []):
        rule = _compile_rule(ctx, raw, f"spec.rules[{index}]", _line(raw_rules, index, spec.line_of("rules")), ref)
        if rule is not None:
            rules.append(rule)
    if _error_count(ctx) != errors_before:
        return
    ctx.result.authorization_policies.append(AuthorizationPolicy(ref, scope, action, tuple(rules), dry_run))


def _error_count(ctx: _Context) -> int:
    return sum(1 for p in ctx.result.problems if p.severity == "error")


def _compile_rule(ctx: _Context, raw: Any, path: str, line: int, ref: PolicyRef) -> Rule | None:
    rule = _mapping(ctx, raw, path, line, {"from", "to", "when"})
    if rule is None:
        return None
    sources = _compile_clauses(ctx, rule, "from", "source", _SOURCE_FIELDS, path, ref)
    operations = _compile_clauses(ctx, rule, "to", "operation", _OPERATION_FIELDS, path, ref)
    conditions: list[FieldCheck] = []
    raw_when = rule.get("when")
    if raw_when is not None:
        if not isinstance(raw_when, list) or not raw_when:
            ctx.error(rule.line_of("when"), f"{path}.when", "expected a non-empty list of conditions")
        else:
            for index, item in enumerate(raw_when):
                check = _compile_condition(ctx, item, f"{path}.when[{index}]",
                                           _line(raw_when, index, rule.line_of("when")), ref)
                if check is not None:
                    conditions.append(check)
    return Rule(tuple(sources), tuple(operations), tuple(conditions))


def _compile_clauses(
    ctx: _Context, rule: LocatedMap, key: str, inner: str, fields: tuple[str, ...], path: str, ref: PolicyRef
) -> list[tuple[FieldCheck, ...]]:
    raw = rule.get(key)
    if raw is None:
        return []
    line = rule.line_of(key)
    if not isinstance(raw, list) or not raw:
        ctx.error(line, f"{path}.{key}", f"'{key}' must be a non-empty list; remove it to match any {inner}")
        return []
    clauses = []
    for index, item in enumerate(raw):
        item_path = f"{path}.{key}[{index}]"
        item_line = _line(raw, index, line)
        wrapper = _mapping(ctx, item, item_path, item_line, {inner})
        if wrapper is None:
            continue
        body = _mapping(ctx, wrapper.get(inner), f"{item_path}.{inner}", wrapper.line_of(inner), fields)
        if body is None:
            continue
        if not any(body.get(name) for name in fields) and all(key in fields for key in body):
            # With an unknown (misspelled) field the error above is the one to fix.
            ctx.error(wrapper.line_of(inner), f"{item_path}.{inner}",
                      f"empty {inner}; set at least one of its fields, or remove '{key}' to match any {inner}")
            continue
        checks = []
        for name in fields:
            if name in body:
                check = _compile_field(ctx, body, name, f"{item_path}.{inner}", ref)
                if check is not None:
                    checks.append(check)
        clauses.append(tuple(checks))
    return clauses


# Each attribute: (getter, value compiler). A value compiler returns a predicate or raises
# ValueError with a message that explains the expected form.
Compiler = Callable[[str], Callable[[Any], bool]]


def _ip_value(value: str) -> Callable[[Any], bool]:
    try:
        network = matchers.parse_network(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or CIDR block (like 10.0.0.0/8)") from None
    return matchers.ip_matcher([network])


def _port_value(value: str) -> Callable[[Any], bool]:
    if not value.isdigit() or not 0 <= int(value) <= 65535:
        raise ValueError(f"{value!r} is not a port number from 0 to 65535")
    port = int(value)
    return lambda actual: actual == port


def _path_value(value: str) -> Callable[[Any], bool]:
    if matchers.is_path_template(value):
        problem = matchers.path_template_problem(value)
        if problem:
            raise ValueError(f"invalid path template {value!r}: {problem}")
    return matchers.path_matcher(value)


def _header_value(value: str) -> Callable[[Any], bool]:
    if value == "*":
        return lambda actual: True  # "*" on a header means present, even when empty
    return matchers.string_matcher(value)


def _plain(value: str) -> Callable[[Any], bool]:
    return matchers.string_matcher(value)


def _host_value(value: str) -> Callable[[Any], bool]:
    return matchers.string_matcher(value, ignore_case=True)


def _principal(ctx_: RequestContext) -> str | None:
    return ctx_.source_principal


_FIELD_TABLE: dict[str, tuple[Callable[[RequestContext], Any], Compiler]] = {
    "principals": (_principal, _plain),
    "requestPrincipals": (matchers.token_principal, matchers.request_principal_matcher),
    "namespaces": (_principal, matchers.namespace_matcher),
    "ipBlocks": (lambda c: c.source_ip, _ip_value),
    "remoteIpBlocks": (lambda c: c.remote_ip, _ip_value),
    "hosts": (lambda c: c.host, _host_value),
    "ports": (lambda c: c.destination_port, _port_value),
    "methods": (lambda c: c.method, _plain),
    "paths": (lambda c: c.path, _path_value),
}


def _compile_field(ctx: _Context, body: LocatedMap, name: str, path: str, ref: PolicyRef) -> FieldCheck | None:
    values = _string_list(ctx, body, name, path)
    if values is None:
        return None
    negative = name.startswith("not")
    base = name[3].lower() + name[4:] if negative else name
    if base == "serviceAccounts":
        return _compile_service_accounts(ctx, body, name, path, ref, values, negative)
    getter, compiler = _FIELD_TABLE[base]
    predicates = _compile_values(ctx, values, compiler, body, name, path)
    if predicates is None:
        return None
    if negative:
        return FieldCheck(name, getter, (), predicates)
    return FieldCheck(name, getter, predicates, ())


def _compile_values(
    ctx: _Context, values: list[str], compiler: Compiler, parent: LocatedMap, name: str, path: str
) -> list[Callable[[Any], bool]] | None:
    predicates = []
    items = parent.get(name)
    ok = True
    for index, value in enumerate(values):
        try:
            predicates.append(compiler(value))
        except ValueError as exc:
            ctx.error(_line(items, index, parent.line_of(name)), f"{path}.{name}[{index}]", str(exc))
            ok = False
    return predicates if ok else None


def _compile_service_accounts(
    ctx: _Context, body: LocatedMap, name: str, path: str, ref: PolicyRef, values: list[str], negative: bool
) -> FieldCheck | None:
    line = body.line_of(name)
    if any(body.get(other) for other in ("principals", "notPrincipals", "namespaces", "notNamespaces")):
        ctx.error(line, f"{path}.{name}", "cannot be combined with principals or namespaces")
        return None
    if len(values) > 16:
        ctx.error(line, f"{path}.{name}", "at most 16 service accounts are allowed")
        return None
    for value in values:
        if "*" in value or value.count("/") > 1:
            ctx.error(line, f"{path}.{name}", f"{value!r} must be 'name' or 'namespace/name' without wildcards")
            return None
    predicates = [matchers.service_account_matcher(v, ref.namespace) for v in values]
    return FieldCheck(name, _principal, () if negative else predicates, predicates if negative else ())


_WHEN_BRACKET = re.compile(r"\[([^\[\]]*)\]")
_SIMPLE_KEYS: dict[str, tuple[Callable[[RequestContext], Any], Compiler]] = {
    "source.ip": (lambda c: c.source_ip, _ip_value),
    "remote.ip": (lambda c: c.remote_ip, _ip_value),
    "source.namespace": (_principal, matchers.namespace_matcher),
    "source.principal": (_principal, _plain),
    "request.auth.principal": (matchers.token_principal, matchers.request_principal_matcher),
    "request.auth.audiences": (matchers.audiences, _plain),
    "request.auth.presenter": (matchers.presenter, _plain),
    "destination.ip": (lambda c: c.destination_ip, _ip_value),
    "destination.port": (lambda c: c.destination_port, _port_value),
    "connection.sni": (lambda c: c.sni, _plain),
}
_REJECTED_KEYS = ("destination.labels", "destination.namespace", "destination.name", "destination.user")


def _bracket_names(key: str, prefix: str) -> list[str] | None:
    """Split `prefix[a][b]` into ["a", "b"]; None when the key is not of that form."""
    rest = key[len(prefix):]
    names = _WHEN_BRACKET.findall(rest)
    if not names or "".join(f"[{n}]" for n in names) != rest or any(not n for n in names):
        return None
    return names


def _condition_target(key: str, ref: PolicyRef) -> tuple[Callable[[RequestContext], Any], Compiler] | str:
    """Return the getter and value compiler of a `when` key, or why the key is invalid."""
    if key in _SIMPLE_KEYS:
        return _SIMPLE_KEYS[key]
    if key == "source.serviceAccount":
        return (_principal, lambda value: matchers.service_account_matcher(value, ref.namespace))
    for prefix, header_getter in (("request.headers", matchers.header_getter),
                                  ("request.experimental.inline.headers", matchers.inline_header_getter)):
        if key.startswith(prefix + "["):
            names = _bracket_names(key, prefix)
            if names is None or len(names) != 1 or not _HEADER_NAME.match(names[0]):
                return f"{key!r} must name one header, like {prefix}[x-user]"
            return (header_getter(names[0]), _header_value)
    if key.startswith("request.auth.claims["):
        names = _bracket_names(key, "request.auth.claims")
        if names is None:
            return f"{key!r} must name a claim, like request.auth.claims[groups] or request.auth.claims[a][b]"
        return (matchers.claim_getter(names), _plain)
    if key.startswith(_REJECTED_KEYS):
        return f"{key!r} is not supported in conditions; use spec.selector to choose workloads"
    if key.startswith("experimental.envoy.filters."):
        return f"{key!r} reads Envoy dynamic metadata, which extauthz does not receive; remove the condition"
    return (f"unknown key {key!r}; supported keys are request.headers[...], request.auth.claims[...], "
            + ", ".join(sorted(_SIMPLE_KEYS)) + ", source.serviceAccount")


def _compile_condition(ctx: _Context, raw: Any, path: str, line: int, ref: PolicyRef) -> FieldCheck | None:
    condition = _mapping(ctx, raw, path, line, {"key", "values", "notValues"})
    if condition is None:
        return None
    key = condition.get("key")
    if not isinstance(key, str) or not key:
        ctx.error(condition.line_of("key"), f"{path}.key", "a condition needs a key")
        return None
    target = _condition_target(key, ref)
    if isinstance(target, str):
        ctx.error(condition.line_of("key"), f"{path}.key", target)
        return None
    values = _string_list(ctx, condition, "values", path)
    not_values = _string_list(ctx, condition, "notValues", path)
    if not values and not not_values:
        ctx.error(line, path, f"condition {key!r} needs values or notValues")
        return None
    getter, compiler = target
    positive = _compile_values(ctx, values or [], compiler, condition, "values", path)
    negative = _compile_values(ctx, not_values or [], compiler, condition, "notValues", path)
    if positive is None or negative is None:
        return None
    return FieldCheck(key, getter, positive, negative)
