"""JWT parsing and verification with the checks, order and messages of Envoy's jwt_authn.

The error strings are the ones Envoy returns (google/jwt_verify_lib `status.cc`), because
clients and dashboards that work with Istio match on them. The algorithm is never taken
from the token alone: a key is used only when its type and curve fit the token's `alg`,
and `alg: none` is rejected.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from extauthz.errors import ExtAuthzError
from extauthz.keys import ALGORITHMS, Jwk

CLOCK_SKEW_S = 60  # Envoy's default; Istio does not change it

# reason code -> body returned to the client (Envoy jwt_authn wording)
TOKEN_FAILURES: dict[str, str] = {
    "jwt_bad_format": "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections",
    "jwt_header_bad_base64": "Jwt header is an invalid Base64url encoded",
    "jwt_header_bad_json": "Jwt header is an invalid JSON",
    "jwt_alg_missing": "Jwt header [alg] field is required and must be a string",
    "jwt_alg_unsupported": "Jwt header [alg] is not supported",
    "jwt_kid_bad_type": "Jwt header [kid] field is not a string",
    "jwt_payload_bad_base64": "Jwt payload is an invalid Base64url encoded",
    "jwt_payload_bad_json": "Jwt payload is an invalid JSON",
    "jwt_iss_bad_type": "Jwt payload [iss] field is not a string",
    "jwt_sub_bad_type": "Jwt payload [sub] field is not a string",
    "jwt_iat_bad_type": "Jwt payload [iat] field is not an integer",
    "jwt_nbf_bad_type": "Jwt payload [nbf] field is not an integer",
    "jwt_exp_bad_type": "Jwt payload [exp] field is not an integer",
    "jwt_jti_bad_type": "Jwt payload [jti] field is not a string",
    "jwt_aud_bad_type": "Jwt payload [aud] field is not a string or string list",
    "jwt_signature_bad_base64": "Jwt signature is an invalid Base64url encoded",
    "jwt_issuer_not_configured": "Jwt issuer is not configured",
    "jwt_expired": "Jwt is expired",
    "jwt_not_yet_valid": "Jwt not yet valid",
    "jwt_audience_not_allowed": "Audiences in Jwt are not allowed",
    "jwks_no_matching_key": "Jwks doesn't have key to match kid or alg from Jwt",
    "jwt_signature_invalid": "Jwt verification fails",
    "jwks_fetch_failed": "Jwks remote fetch is failed",
    "jwks_no_valid_key": "Jwks doesn't have any valid public key",
    "jwt_missing": "Jwt is missing",
}


class TokenError(ExtAuthzError):
    """A token that must be rejected; `reason` is a key of TOKEN_FAILURES."""

    def __init__(self, reason: str) -> None:
        super().__init__(TOKEN_FAILURES[reason])
        self.reason = reason

    @property
    def body(self) -> str:
        return TOKEN_FAILURES[self.reason]

    @property
    def http_status(self) -> int:
        # Envoy returns 403 only for an audience mismatch; every other failure is 401.
        return 403 if self.reason == "jwt_audience_not_allowed" else 401


_BASE64URL = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")


def decode_base64url(segment: str) -> bytes | None:
    """Decode unpadded (or padded) base64url; None when the text is not base64url."""
    if not _BASE64URL.match(segment):
        return None
    stripped = segment.rstrip("=")
    if len(stripped) % 4 == 1:
        return None
    try:
        return base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except (binascii.Error, ValueError):
        return None


@dataclass(frozen=True)
class ParsedJwt:
    header: dict[str, Any]
    payload: dict[str, Any]
    alg: str
    kid: str | None
    issuer: str | None
    subject: str | None
    signing_input: bytes
    signature: bytes
    payload_segment: str


def _is_integer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _decode_json_segment(segment: str, bad_base64: str, bad_json: str) -> dict[str, Any]:
    raw = decode_base64url(segment)
    if raw is None:
        raise TokenError(bad_base64)
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise TokenError(bad_json) from None
    if not isinstance(value, dict):
        raise TokenError(bad_json)
    return value


def parse_jwt(text: str) -> ParsedJwt:
    """Decode a compact JWS and check the type of every registered header and claim."""
    parts = text.split(".")
    if len(parts) != 3 or not all(parts):
        raise TokenError("jwt_bad_format")
    header_segment, payload_segment, signature_segment = parts

    header = _decode_json_segment(header_segment, "jwt_header_bad_base64", "jwt_header_bad_json")
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise TokenError("jwt_alg_missing")
    if alg not in ALGORITHMS:
        raise TokenError("jwt_alg_unsupported")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise TokenError("jwt_kid_bad_type")

    payload = _decode_json_segment(payload_segment, "jwt_payload_bad_base64", "jwt_payload_bad_json")
    for claim in ("iss", "sub"):
        if claim in payload and not isinstance(payload[claim], str):
            raise TokenError(f"jwt_{claim}_bad_type")
    for claim in ("iat", "nbf", "exp"):
        if claim in payload and not _is_integer(payload[claim]):
            raise TokenError(f"jwt_{claim}_bad_type")
    if "jti" in payload and not isinstance(payload["jti"], str):
        raise TokenError("jwt_jti_bad_type")
    aud = payload.get("aud")
    if aud is not None and not isinstance(aud, str):
        if not isinstance(aud, list) or not all(isinstance(item, str) for item in aud):
            raise TokenError("jwt_aud_bad_type")

    signature = decode_base64url(signature_segment)
    if signature is None:
        raise TokenError("jwt_signature_bad_base64")

    return ParsedJwt(
        header=header,
        payload=payload,
        alg=alg,
        kid=kid or None,
        issuer=payload.get("iss"),
        subject=payload.get("sub"),
        signing_input=f"{header_segment}.{payload_segment}".encode("ascii"),
        signature=signature,
        payload_segment=payload_segment,
    )


def check_time(jwt: ParsedJwt, now: float, skew: int = CLOCK_SKEW_S) -> None:
    nbf = jwt.payload.get("nbf")
    if nbf is not None and now + skew < nbf:
        raise TokenError("jwt_not_yet_valid")
    exp = jwt.payload.get("exp")
    if exp is not None and now > exp + skew:
        raise TokenError("jwt_expired")


def normalize_audience(value: str) -> str:
    """Drop a leading http(s):// and one trailing "/", as Envoy does when comparing audiences."""
    for scheme in ("https://", "http://"):
        if value.startswith(scheme):
            value = value[len(scheme):]
            break
    return value[:-1] if value.endswith("/") else value


def check_audience(jwt: ParsedJwt, allowed: Sequence[str]) -> None:
    """Require one token audience in `allowed` (already normalized); empty `allowed` skips the check."""
    if not allowed:
        return
    aud = jwt.payload.get("aud")
    values = [aud] if isinstance(aud, str) else (aud or [])
    if not any(normalize_audience(value) in allowed for value in values):
        raise TokenError("jwt_audience_not_allowed")


def verify_signature(jwt: ParsedJwt, keys: Sequence[Jwk]) -> None:
    """Verify with the first fitting key, selected by `kid` and `alg` like jwt_verify_lib."""
    algorithm, kty, crv = ALGORITHMS[jwt.alg]
    candidate_found = False
    for key in keys:
        if jwt.kid and key.kid and key.kid != jwt.kid:
            continue
        if key.alg and key.alg != jwt.alg:
            continue
        candidate_found = True
        if key.kty != kty or (crv is not None and key.crv != crv):
            continue
        if algorithm.verify(jwt.signing_input, key.key, jwt.signature):
            return
    raise TokenError("jwt_signature_invalid" if candidate_found else "jwks_no_matching_key")
