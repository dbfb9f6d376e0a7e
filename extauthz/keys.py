"""JSON Web Keys: parse a JWKS once into key objects that verify signatures."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from jwt.algorithms import (
    Algorithm,
    ECAlgorithm,
    HMACAlgorithm,
    OKPAlgorithm,
    RSAAlgorithm,
    RSAPSSAlgorithm,
)

from extauthz.errors import JwksFetchError

logger = logging.getLogger("extauthz.jwks")

# alg -> (verifier, required kty, required crv). The set Envoy's jwt_authn supports.
ALGORITHMS: dict[str, tuple[Algorithm, str, str | None]] = {
    "RS256": (RSAAlgorithm(RSAAlgorithm.SHA256), "RSA", None),
    "RS384": (RSAAlgorithm(RSAAlgorithm.SHA384), "RSA", None),
    "RS512": (RSAAlgorithm(RSAAlgorithm.SHA512), "RSA", None),
    "PS256": (RSAPSSAlgorithm(RSAPSSAlgorithm.SHA256), "RSA", None),
    "PS384": (RSAPSSAlgorithm(RSAPSSAlgorithm.SHA384), "RSA", None),
    "PS512": (RSAPSSAlgorithm(RSAPSSAlgorithm.SHA512), "RSA", None),
    "ES256": (ECAlgorithm(ECAlgorithm.SHA256), "EC", "P-256"),
    "ES384": (ECAlgorithm(ECAlgorithm.SHA384), "EC", "P-384"),
    "ES512": (ECAlgorithm(ECAlgorithm.SHA512), "EC", "P-521"),
    "HS256": (HMACAlgorithm(HMACAlgorithm.SHA256), "oct", None),
    "HS384": (HMACAlgorithm(HMACAlgorithm.SHA384), "oct", None),
    "HS512": (HMACAlgorithm(HMACAlgorithm.SHA512), "oct", None),
    "EdDSA": (OKPAlgorithm(), "OKP", "Ed25519"),
}

_PARSERS: dict[str, Any] = {
    "RSA": RSAAlgorithm.from_jwk,
    "EC": ECAlgorithm.from_jwk,
    "OKP": OKPAlgorithm.from_jwk,
    "oct": HMACAlgorithm.from_jwk,
}
_CURVES = {"EC": ("P-256", "P-384", "P-521"), "OKP": ("Ed25519",)}


@dataclass(frozen=True)
class Jwk:
    """One usable verification key."""

    kid: str | None
    alg: str | None
    kty: str
    crv: str | None
    key: Any  # a cryptography public key, or bytes for oct


def parse_jwk(entry: Any) -> Jwk:
    """Build a Jwk from one JWKS entry; raises ValueError saying why it cannot be used."""
    if not isinstance(entry, dict):
        raise ValueError("entry is not a JSON object")
    kty = entry.get("kty")
    if kty not in _PARSERS:
        raise ValueError(f"unsupported kty {kty!r}")
    use = entry.get("use")
    if use is not None and use != "sig":
        raise ValueError(f"use is {use!r}, not 'sig'")
    kid = entry.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("kid is not a string")
    alg = entry.get("alg")
    if alg is not None:
        if alg not in ALGORITHMS:
            raise ValueError(f"unsupported alg {alg!r}")
        if ALGORITHMS[alg][1] != kty:
            raise ValueError(f"alg {alg} does not fit kty {kty}")
    crv = entry.get("crv")
    if kty in _CURVES and crv not in _CURVES[kty]:
        raise ValueError(f"unsupported curve {crv!r}")
    try:
        key = _PARSERS[kty](json.dumps(entry))
    except Exception as exc:  # pyjwt raises several types for malformed key material
        raise ValueError(f"invalid key material: {exc}") from None
    if hasattr(key, "public_key") and kty != "oct":
        key = key.public_key()  # a private JWK published by mistake still only verifies
    return Jwk(kid or None, alg, kty, crv, key)


def parse_jwks(document: bytes | str, origin: str, *, allow_oct: bool = False) -> tuple[Jwk, ...]:
    """Parse a JWKS document; unusable keys are logged and skipped.

    Symmetric `oct` keys are accepted only with `allow_oct`, which inline `jwks` sets: a
    shared secret fetched from a URL would let anyone who can read it mint tokens.
    Raises JwksFetchError when the document is not a JWKS at all.
    """
    try:
        value = json.loads(document)
    except (ValueError, UnicodeDecodeError) as exc:
        raise JwksFetchError(f"JWKS from {origin} is not valid JSON: {exc}") from None
    if not isinstance(value, dict) or not isinstance(value.get("keys"), list):
        raise JwksFetchError(f'JWKS from {origin} is not a JSON object with a "keys" list')
    keys = []
    for index, entry in enumerate(value["keys"]):
        try:
            if not allow_oct and isinstance(entry, dict) and entry.get("kty") == "oct":
                raise ValueError("symmetric oct keys are accepted only in an inline jwks")
            keys.append(parse_jwk(entry))
        except ValueError as exc:
            kid = entry.get("kid") if isinstance(entry, dict) else None
            logger.warning("skipping key %d (kid %r) of the JWKS from %s: %s", index, kid, origin, exc)
    return tuple(keys)
