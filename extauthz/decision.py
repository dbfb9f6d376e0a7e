"""Decisions and the one table that maps each outcome to its gRPC code and HTTP response."""

from __future__ import annotations

from dataclasses import dataclass

from extauthz.tokens import TokenError

# gRPC status codes (google.rpc.Code) used in CheckResponse.status
OK = 0
INVALID_ARGUMENT = 3
PERMISSION_DENIED = 7
INTERNAL = 13
UNAUTHENTICATED = 16

RBAC_DENIED_BODY = "RBAC: access denied"

# reason code -> (gRPC code, HTTP status, body) for every deny that is not a token failure
DENY_OUTCOMES: dict[str, tuple[int, int, str]] = {
    "denied_by_policy": (PERMISSION_DENIED, 403, RBAC_DENIED_BODY),
    "no_allow_policy_matched": (PERMISSION_DENIED, 403, RBAC_DENIED_BODY),
    "workload_unknown": (PERMISSION_DENIED, 403, RBAC_DENIED_BODY),
    "policies_not_loaded": (PERMISSION_DENIED, 403, RBAC_DENIED_BODY),
    "invalid_path": (INVALID_ARGUMENT, 400, "Bad Request"),
    "internal_error": (INTERNAL, 403, "Internal authorization error"),
}

ALLOW_REASONS = ("allowed_by_policy", "allowed_no_allow_policy")


@dataclass(frozen=True)
class Decision:
    """The outcome of one Check, with what Envoy must change on the request or send back."""

    allowed: bool
    reason: str
    grpc_code: int
    http_status: int
    body: str = ""
    response_headers: tuple[tuple[str, str], ...] = ()  # sent to the client on deny
    headers_to_set: tuple[tuple[str, str], ...] = ()  # set on the upstream request, replacing any value
    headers_to_remove: tuple[str, ...] = ()
    query_parameters_to_remove: tuple[str, ...] = ()
    principal: str | None = None  # request principal iss/sub of the verified token
    policy: str | None = None  # namespace/name of the deciding policy
    rule: int | None = None  # index of the deciding rule in that policy
    revision: str = ""
    audited: bool = False
    shadow: tuple[str, ...] = ()  # results of dry-run policies


def denied(reason: str, *, revision: str = "", policy: str | None = None, rule: int | None = None,
           principal: str | None = None, shadow: tuple[str, ...] = (), audited: bool = False) -> Decision:
    code, status, body = DENY_OUTCOMES[reason]
    return Decision(False, reason, code, status, body, revision=revision, policy=policy, rule=rule,
                    principal=principal, shadow=shadow, audited=audited)


def token_denied(failure: TokenError, realm: str, *, revision: str = "", policy: str | None = None) -> Decision:
    challenge = f'Bearer realm="{realm}"'
    if failure.reason != "jwt_missing":
        challenge += ', error="invalid_token"'
    headers = (("www-authenticate", challenge), ("content-type", "text/plain"))
    return Decision(False, failure.reason, UNAUTHENTICATED, failure.http_status, failure.body,
                    response_headers=headers, revision=revision, policy=policy)
