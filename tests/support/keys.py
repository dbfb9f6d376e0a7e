"""Signing keys, JWKS documents and JWTs for tests.

Keys are generated at run time with `cryptography` and tokens are signed with PyJWT,
so every token a test sends has a real signature unless the test builds it otherwise.
"""

from __future__ import annotations

import base64
import functools
import json
import time
from dataclasses import dataclass
from types import EllipsisType
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})

# Each ECDSA JWS algorithm is defined for exactly one curve.
EC_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
}


@dataclass(frozen=True)
class SigningKey:
    """Private key with the `kid` and `alg` that its public JWK advertises."""

    kid: str | None
    alg: str
    private_key: PrivateKey

    def public_jwk(self) -> dict[str, Any]:
        """Return the public key as a JWK with `use: sig`, `alg` and `kid` (when set)."""
        public_key = self.private_key.public_key()
        if isinstance(public_key, rsa.RSAPublicKey):
            jwk = RSAAlgorithm.to_jwk(public_key, as_dict=True)
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            jwk = ECAlgorithm.to_jwk(public_key, as_dict=True)
        else:
            jwk = OKPAlgorithm.to_jwk(public_key, as_dict=True)

        jwk["alg"] = self.alg
        jwk["use"] = "sig"
        if self.kid is not None:
            jwk["kid"] = self.kid
        return jwk

    def can_sign_with(self, alg: str) -> bool:
        """Return whether PyJWT can make a valid `alg` signature with this key."""
        if isinstance(self.private_key, rsa.RSAPrivateKey):
            return alg in RSA_ALGORITHMS
        if isinstance(self.private_key, ec.EllipticCurvePrivateKey):
            curve = EC_CURVES.get(alg)
            return curve is not None and isinstance(self.private_key.curve, curve)
        return alg == "EdDSA"


@functools.cache
def _cached_rsa_key(kid: str | None, alg: str, bits: int) -> SigningKey:
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return SigningKey(kid=kid, alg=alg, private_key=private_key)


def make_rsa_key(kid: str | None, alg: str = "RS256", bits: int = 2048, *, fresh: bool = False) -> SigningKey:
    """Return an RSA signing key for `alg` (RS* or PS*).

    RSA key generation is slow, so keys are cached per (kid, alg, bits) for
    the test session and equal arguments return the same key. Pass `fresh=True` for a
    new key, for example a rotated key that reuses a `kid`.
    """
    if alg not in RSA_ALGORITHMS:
        raise ValueError(f"invalid RSA algorithm {alg!r}: expected one of {sorted(RSA_ALGORITHMS)}")
    if fresh:
        return _cached_rsa_key.__wrapped__(kid, alg, bits)
    return _cached_rsa_key(kid, alg, bits)


def make_ec_key(kid: str | None, alg: str = "ES256") -> SigningKey:
    """Generate a new EC key on the curve that `alg` requires (P-256, P-384 or P-521)."""
    curve = EC_CURVES.get(alg)
    if curve is None:
        raise ValueError(f"invalid ECDSA algorithm {alg!r}: expected one of {sorted(EC_CURVES)}")
    return SigningKey(kid=kid, alg=alg, private_key=ec.generate_private_key(curve()))


def make_ed25519_key(kid: str | None) -> SigningKey:
    """Generate a new Ed25519 key (JWK `kty: OKP`, `crv: Ed25519`, `alg: EdDSA`)."""
    return SigningKey(kid=kid, alg="EdDSA", private_key=ed25519.Ed25519PrivateKey.generate())


def jwks_document(*keys: SigningKey) -> dict[str, Any]:
    """Return a JWKS document that publishes the public half of each key."""
    return {"keys": [key.public_jwk() for key in keys]}


def _base64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json_segment(value: dict[str, Any]) -> str:
    return _base64url(json.dumps(value, separators=(",", ":")).encode("utf-8"))


def sign_token(
    key: SigningKey,
    claims: dict[str, Any],
    *,
    kid: str | None | EllipsisType = ...,
    alg: str | None = None,
    extra_headers: dict[str, Any] | None = None,
) -> str:
    """Sign `claims` with `key` and return the compact JWT.

    `kid=...` puts `key.kid` in the header, `kid=None` leaves the header without a
    `kid`, and a string sets that `kid`. `alg` sets the header `alg`. When the key
    cannot sign with that `alg` (for example `HS256` on an RSA key), the header still
    says `alg`, but the signature over that header is made with `key.alg`. Such a token
    is correctly signed by the key, and only its `alg` disagrees with the JWK.
    """
    header_kid = key.kid if kid is ... else kid
    header_alg = alg or key.alg

    headers: dict[str, Any] = {}
    if header_kid is not None:
        headers["kid"] = header_kid
    if extra_headers:
        headers.update(extra_headers)

    if key.can_sign_with(header_alg):
        return jwt.encode(claims, key.private_key, algorithm=header_alg, headers=headers)

    header = {"typ": "JWT", "alg": header_alg, **headers}
    signing_input = f"{_json_segment(header)}.{_json_segment(claims)}"
    signature = jwt.get_algorithm_by_name(key.alg).sign(signing_input.encode("ascii"), key.private_key)
    return f"{signing_input}.{_base64url(signature)}"


def unsigned_token(
    claims: dict[str, Any],
    header: dict[str, Any] | None = None,
    signature_segment: str = "",
) -> str:
    """Return a JWT with no valid signature, by default `{"alg": "none"}` with an empty signature."""
    token_header = header if header is not None else {"alg": "none", "typ": "JWT"}
    return f"{_json_segment(token_header)}.{_json_segment(claims)}.{signature_segment}"


def standard_claims(
    issuer: str,
    subject: str = "alice",
    audiences: tuple[str, ...] | list[str] | None = ("api.example.com",),
    ttl_s: int = 3600,
    **extra: Any,
) -> dict[str, Any]:
    """Return `iss`, `sub`, `aud`, `iat` and `exp` claims relative to the current time.

    A single audience becomes a string `aud`, several become a list, and an empty or
    `None` value leaves `aud` out. A zero or negative `ttl_s` gives an expired token.
    Keyword arguments add claims or replace the standard ones.
    """
    now = int(time.time())
    expires_at = now + ttl_s
    # An expired token keeps `iat` before `exp`, so `exp` is its only defect.
    issued_at = now if ttl_s > 0 else expires_at - 3600

    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": subject,
        "iat": issued_at,
        "exp": expires_at,
    }
    if audiences:
        audience_list = list(audiences)
        claims["aud"] = audience_list[0] if len(audience_list) == 1 else audience_list
    claims.update(extra)
    return claims
