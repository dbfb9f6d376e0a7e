"""The policy engine alone: authentication, header changes and authorization, no gRPC."""

from __future__ import annotations

import json
import socket
import textwrap
import time

import pytest

from extauthz.engine import Authorizer, PolicySnapshot, extract_token
from extauthz.jwks import JwksCache
from extauthz.policy import compile_policy_files
from extauthz.policy.model import DEFAULT_LOCATIONS, LocationKind, TokenLocation
from extauthz.request import RequestContext, Workload, parse_ip
from tests.support.keys import (
    SigningKey,
    jwks_document,
    make_ec_key,
    make_ed25519_key,
    make_rsa_key,
    sign_token,
    standard_claims,
    unsigned_token,
)

ISSUER = "https://issuer.test"
WORKLOAD = Workload.of("foo", {"app": "httpbin"})


@pytest.fixture(scope="module")
def rsa_key() -> SigningKey:
    return make_rsa_key("r1")


@pytest.fixture(scope="module")
def other_keys() -> list[SigningKey]:
    return [make_ec_key("e384", "ES384"), make_ed25519_key("ed"), make_rsa_key("ps", "PS256")]


def request_authentication(jwks: dict, **rule_fields: object) -> str:
    rule = {"issuer": ISSUER, "jwks": json.dumps(jwks), **rule_fields}
    return json.dumps({
        "apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
        "metadata": {"name": "jwt", "namespace": "foo"},
        "spec": {"selector": {"matchLabels": {"app": "httpbin"}}, "jwtRules": [rule]},
    })


def authorizer_for(*documents: str, clock: float | None = None) -> Authorizer:
    text = "\n---\n".join(textwrap.dedent(d) for d in documents)
    policy_set = compile_policy_files([("policies.yaml", text.encode())])
    jwks = JwksCache()
    jwks.update(policy_set.inline_jwks, policy_set.remote_jwks)
    return Authorizer(jwks, PolicySnapshot(policy_set, "istio-system"),
                      clock=(lambda: clock) if clock is not None else time.time)


def request(path: str = "/", headers: dict[str, str] | None = None, method: str = "GET") -> RequestContext:
    bare, _, query = path.partition("?")
    return RequestContext(method=method, path=bare, raw_path=path, query=query, host="httpbin.foo",
                          headers={k.lower(): v for k, v in (headers or {}).items()},
                          source_ip=parse_ip("10.0.0.1"), remote_ip=parse_ip("10.0.0.1"))


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


REQUIRE_JWT = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: require-jwt, namespace: foo}
spec:
  rules:
  - from:
    - source:
        requestPrincipals: ["*"]
"""


# --- token extraction ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("Bearer    abc.def.ghi", "abc.def.ghi"),
        ("Basic dXNlcjpwYXNz", None),
        ("bearer abc.def.ghi", None),  # the prefix is case-sensitive
        ("Bearer ", None),
    ],
)
def test_extract_token_from_authorization(value: str, expected: str | None) -> None:
    location = DEFAULT_LOCATIONS[0]
    assert extract_token(request(headers={"Authorization": value}), location) == expected


def test_extract_token_query_cookie_and_plain_header() -> None:
    ctx = request("/x?a=1&access_token=q%2Etoken&access_token=second", {"cookie": "a=1; session=c.t.k",
                                                                       "x-jwt": " raw.t.k "})
    assert extract_token(ctx, TokenLocation(LocationKind.QUERY, "access_token")) == "q.token"
    assert extract_token(ctx, TokenLocation(LocationKind.COOKIE, "session")) == "c.t.k"
    assert extract_token(ctx, TokenLocation(LocationKind.HEADER, "x-jwt")) == "raw.t.k"
    assert extract_token(ctx, TokenLocation(LocationKind.COOKIE, "other")) is None


# --- authentication -----------------------------------------------------------------------------


def test_valid_token_sets_principal_and_headers(rsa_key: SigningKey) -> None:
    claims = standard_claims(ISSUER, "alice", n=42, ratio=1.5, admin=True, org={"team": "core"}, groups=["a"])
    authorizer = authorizer_for(request_authentication(
        jwks_document(rsa_key),
        outputPayloadToHeader="x-payload",
        outputClaimToHeaders=[{"header": "x-n", "claim": "n"}, {"header": "x-ratio", "claim": "ratio"},
                              {"header": "x-admin", "claim": "admin"}, {"header": "x-team", "claim": "org.team"},
                              {"header": "x-groups", "claim": "groups"}],
    ), REQUIRE_JWT)
    token = sign_token(rsa_key, claims)
    decision = authorizer.decide(request(headers={**bearer(token), "x-groups": "spoofed"}), WORKLOAD)

    assert decision.allowed, decision
    assert decision.principal == f"{ISSUER}/alice"
    assert dict(decision.headers_to_set) == {
        "x-payload": token.split(".")[1], "x-n": "42", "x-ratio": "1.500000", "x-admin": "true", "x-team": "core",
    }
    # A list claim is not copied, and the client's own value is removed.
    assert set(decision.headers_to_remove) == {"authorization", "x-groups"}


def test_forward_original_token_keeps_header(rsa_key: SigningKey) -> None:
    authorizer = authorizer_for(request_authentication(jwks_document(rsa_key), forwardOriginalToken=True))
    decision = authorizer.decide(request(headers=bearer(sign_token(rsa_key, standard_claims(ISSUER)))), WORKLOAD)
    assert decision.allowed
    assert "authorization" not in decision.headers_to_remove


def test_query_token_parameter_removed(rsa_key: SigningKey) -> None:
    authorizer = authorizer_for(request_authentication(jwks_document(rsa_key)))
    token = sign_token(rsa_key, standard_claims(ISSUER))
    decision = authorizer.decide(request(f"/p?access_token={token}&x=1"), WORKLOAD)
    assert decision.allowed
    assert decision.query_parameters_to_remove == ("access_token",)


@pytest.mark.parametrize(
    ("claims_change", "reason", "status"),
    [
        ({"exp": -3600}, "jwt_expired", 401),
        ({"exp": -30}, None, 200),  # within the 60 s clock skew
        ({"nbf": 3600}, "jwt_not_yet_valid", 401),
        ({"nbf": 30}, None, 200),
        ({"iss": "https://unknown.test"}, "jwt_issuer_not_configured", 401),
        ({"aud": ["elsewhere"]}, "jwt_audience_not_allowed", 403),
        ({"aud": ["x", "https://api.example.com/"]}, None, 200),  # scheme and trailing slash ignored
    ],
)
def test_token_claims_checked(rsa_key: SigningKey, claims_change: dict, reason: str | None, status: int) -> None:
    now = 1_900_000_000
    authorizer = authorizer_for(request_authentication(jwks_document(rsa_key), audiences=["api.example.com"]),
                                clock=now)
    claims = {"iss": ISSUER, "sub": "alice", "aud": ["api.example.com"], "exp": now + 600}
    for name, value in claims_change.items():
        claims[name] = now + value if name in ("exp", "nbf") else value
    decision = authorizer.decide(request(headers=bearer(sign_token(rsa_key, claims))), WORKLOAD)
    assert decision.http_status == status, decision
    if reason:
        assert decision.reason == reason
        challenge = dict(decision.response_headers)["www-authenticate"]
        assert challenge == 'Bearer realm="http://httpbin.foo/", error="invalid_token"'


def test_every_supported_key_type_verifies(other_keys: list[SigningKey]) -> None:
    authorizer = authorizer_for(request_authentication(jwks_document(*other_keys)), REQUIRE_JWT)
    for key in other_keys:
        decision = authorizer.decide(request(headers=bearer(sign_token(key, standard_claims(ISSUER)))), WORKLOAD)
        assert decision.allowed, (key.alg, decision.reason)


def test_alg_none_and_confusion_rejected(rsa_key: SigningKey) -> None:
    public = rsa_key.public_jwk()
    without_alg = {k: v for k, v in public.items() if k != "alg"}
    authorizer = authorizer_for(request_authentication({"keys": [without_alg]}))
    none_token = unsigned_token(standard_claims(ISSUER), {"alg": "none"}, signature_segment="c2ln")
    assert authorizer.decide(request(headers=bearer(none_token)), WORKLOAD).reason == "jwt_alg_unsupported"
    # HS256 signed with the RSA public key as the HMAC secret: the RSA key never verifies HS256.
    import hmac
    from hashlib import sha256

    header_payload = unsigned_token(standard_claims(ISSUER), {"alg": "HS256", "kid": "r1"}).rstrip(".")
    secret = json.dumps(public).encode()
    signature = hmac.new(secret, header_payload.encode(), sha256).digest()
    import base64

    forged = header_payload + "." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
    assert authorizer.decide(request(headers=bearer(forged)), WORKLOAD).reason == "jwt_signature_invalid"


def test_any_bad_token_rejects_request(rsa_key: SigningKey) -> None:
    authorizer = authorizer_for(request_authentication(jwks_document(rsa_key)))
    good = sign_token(rsa_key, standard_claims(ISSUER))
    bad = sign_token(make_rsa_key("r1", fresh=True), standard_claims(ISSUER))
    decision = authorizer.decide(request(f"/?access_token={bad}", bearer(good)), WORKLOAD)
    assert decision.reason == "jwt_signature_invalid"


def test_strict_failure_mode_requires_token(rsa_key: SigningKey) -> None:
    authorizer = authorizer_for(request_authentication(jwks_document(rsa_key), failureMode="STRICT"))
    decision = authorizer.decide(request(), WORKLOAD)
    assert (decision.http_status, decision.body) == (401, "Jwt is missing")
    assert "error=" not in dict(decision.response_headers)["www-authenticate"]


def test_ignore_failure_mode_ignores_bad_token(rsa_key: SigningKey) -> None:
    authorizer = authorizer_for(request_authentication(jwks_document(rsa_key), failureMode="IGNORE"))
    decision = authorizer.decide(request(headers=bearer("not-a-token")), WORKLOAD)
    assert decision.allowed
    assert decision.principal is None


def test_cors_preflight_skips_authentication() -> None:
    authorizer = authorizer_for(request_authentication({"keys": []}))
    ctx = request(method="OPTIONS", headers={**bearer("garbage"), "origin": "https://app",
                                             "access-control-request-method": "POST"})
    assert authorizer.decide(ctx, WORKLOAD).allowed


def test_no_request_authentication_ignores_token() -> None:
    authorizer = authorizer_for(REQUIRE_JWT)
    decision = authorizer.decide(request(headers=bearer("garbage")), WORKLOAD)
    assert decision.reason == "no_allow_policy_matched"
    assert decision.headers_to_remove == ()


def test_unavailable_remote_keys_reject_token() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago refuses connections
        probe.bind(("127.0.0.1", 0))
        closed_url = f"http://127.0.0.1:{probe.getsockname()[1]}/keys"
    ra = json.dumps({"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
                     "metadata": {"name": "jwt", "namespace": "foo"},
                     "spec": {"jwtRules": [{"issuer": ISSUER, "jwksUri": closed_url}]}})
    policy_set = compile_policy_files([("p.yaml", ra.encode())])
    jwks = JwksCache()
    (source,) = jwks.update(policy_set.inline_jwks, policy_set.remote_jwks)
    try:
        assert source.wait_attempted(10)
        authorizer = Authorizer(jwks, PolicySnapshot(policy_set, "istio-system"))
        token = sign_token(make_rsa_key("r1"), standard_claims(ISSUER))
        decision = authorizer.decide(request(headers=bearer(token)), WORKLOAD)
        assert (decision.http_status, decision.body) == (401, "Jwks remote fetch is failed")
        assert authorizer.decide(request(), WORKLOAD).allowed  # no token: authentication passes
    finally:
        jwks.close()


def test_workload_without_policies_warned_once(caplog: pytest.LogCaptureFixture) -> None:
    authorizer = authorizer_for(REQUIRE_JWT)
    other = Workload.of("elsewhere", {"app": "x"})
    with caplog.at_level("WARNING", logger="extauthz.engine"):
        assert authorizer.decide(request(), other).reason == "allowed_no_allow_policy"
        assert authorizer.decide(request(), other).allowed
    warnings = [r.getMessage() for r in caplog.records if "no policy of revision" in r.getMessage()]
    assert len(warnings) == 1
    assert "workload elsewhere {'app': 'x'}" in warnings[0]
