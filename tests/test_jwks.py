"""The JWKS key cache against a real local identity provider: rotation, outages and abuse."""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from extauthz.config import ServeConfig
from extauthz.engine import Authorizer, PolicySnapshot
from extauthz.jwks import HttpFetcher, JwksCache, JwksSettings, RemoteKeySource
from extauthz.policy import compile_policy_files
from extauthz.request import RequestContext, Workload
from extauthz.server import ExtAuthzServer
from tests.support.check_requests import build_check_request, send_check
from tests.support.http_servers import LocalHttpServer
from tests.support.keys import SigningKey, jwks_document, make_rsa_key, sign_token, standard_claims

WORKLOAD = Workload.of("foo", {"app": "httpbin"})
BOUNDED_WAIT_S = 15.0


@pytest.fixture
def idp() -> Iterator[LocalHttpServer]:
    with LocalHttpServer() as server:
        yield server


@pytest.fixture(scope="module")
def k1() -> SigningKey:
    return make_rsa_key("k1")


@pytest.fixture(scope="module")
def k2() -> SigningKey:
    return make_rsa_key("k2")


def ra(name: str, issuer: str, **rule: object) -> dict:
    return {"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
            "metadata": {"name": name, "namespace": "foo"},
            "spec": {"jwtRules": [{"issuer": issuer, **rule}]}}


ALLOW_PUBLIC = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                "metadata": {"name": "public-or-jwt", "namespace": "foo"},
                "spec": {"rules": [{"to": [{"operation": {"paths": ["/public"]}}]},
                                   {"from": [{"source": {"requestPrincipals": ["*"]}}]}]}}


class Setup:
    """An authorizer whose key cache fetches from the local identity provider."""

    def __init__(self, documents: list[dict], settings: JwksSettings, fetcher: HttpFetcher | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        text = "\n---\n".join(json.dumps(d) for d in documents)
        self.policy_set = compile_policy_files([("policies.yaml", text.encode())])
        self.jwks = JwksCache(fetcher, settings)
        self.sources = {s.spec.url: s for s in self.jwks.update(self.policy_set.inline_jwks,
                                                               self.policy_set.remote_jwks)}
        self.authorizer = Authorizer(self.jwks, PolicySnapshot(self.policy_set, "istio-system"), clock=clock)

    def source(self, url: str) -> RemoteKeySource:
        return self.sources[url]

    def decide(self, token: str | None, path: str = "/private"):  # type: ignore[no-untyped-def]
        headers = {"authorization": f"Bearer {token}"} if token else {}
        return self.authorizer.decide(RequestContext(path=path, raw_path=path, host="h", headers=headers), WORKLOAD)

    def close(self) -> None:
        self.jwks.close()


@pytest.fixture
def make_setup() -> Iterator[Callable[..., Setup]]:
    created: list[Setup] = []

    def make(*args: object, **kwargs: object) -> Setup:
        setup = Setup(*args, **kwargs)  # type: ignore[arg-type]
        created.append(setup)
        return setup

    yield make
    for setup in created:
        setup.close()


def wait_until(condition: Callable[[], bool], timeout: float = BOUNDED_WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


ISSUER = "https://idp.test"


def test_rotation_refetches_once(idp: LocalHttpServer, k1: SigningKey, k2: SigningKey,
                                 make_setup: Callable[..., Setup]) -> None:
    idp.set_route("/keys", body=jwks_document(k1))
    setup = make_setup([ra("jwt", ISSUER, jwksUri=idp.url("/keys")), ALLOW_PUBLIC],
                       JwksSettings(kid_cooldown_s=30, kid_refresh_wait_s=5))
    assert setup.source(idp.url("/keys")).wait_attempted(BOUNDED_WAIT_S)
    assert setup.decide(sign_token(k1, standard_claims(ISSUER))).allowed
    assert idp.hits("/keys") == 1

    idp.set_route("/keys", body=jwks_document(k1, k2))  # the identity provider rotates
    first = setup.decide(sign_token(k2, standard_claims(ISSUER, "bob")))
    assert first.allowed, first.reason
    assert idp.hits("/keys") == 2
    assert setup.decide(sign_token(k2, standard_claims(ISSUER, "carol"))).allowed
    assert idp.hits("/keys") == 2


def test_unknown_kid_flood_fetches_once(idp: LocalHttpServer, k1: SigningKey,
                                        make_setup: Callable[..., Setup]) -> None:
    idp.set_route("/keys", body=jwks_document(k1))
    setup = make_setup([ra("jwt", ISSUER, jwksUri=idp.url("/keys"))],
                       JwksSettings(kid_cooldown_s=30, kid_refresh_wait_s=0.1))
    assert setup.source(idp.url("/keys")).wait_attempted(BOUNDED_WAIT_S)
    tokens = [sign_token(k1, standard_claims(ISSUER), kid=secrets.token_hex(8)) for _ in range(1000)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        decisions = list(pool.map(setup.decide, tokens))
    assert all(d.reason == "jwks_no_matching_key" for d in decisions)
    assert idp.hits("/keys") == 2  # the first fetch and one refetch for the whole flood
    assert setup.source(idp.url("/keys")).kid_refreshes == 1


@pytest.mark.parametrize(
    "outage",
    ["http_503", "not_json", "not_a_jwks", "no_usable_key", "too_large", "hangs"],
)
def test_outage_keeps_last_good_keys(idp: LocalHttpServer, k1: SigningKey, make_setup: Callable[..., Setup],
                                     outage: str) -> None:
    idp.set_route("/keys", body=jwks_document(k1))
    setup = make_setup([ra("jwt", ISSUER, jwksUri=idp.url("/keys"), timeout="0.3s")],
                       JwksSettings(refresh_interval_s=0.1, max_bytes=64 * 1024))
    source = setup.source(idp.url("/keys"))
    assert source.wait_attempted(BOUNDED_WAIT_S)
    good_keys = source.keyset

    bodies = {"not_json": b"<html>", "not_a_jwks": {"keys": "none"}, "no_usable_key": {"keys": [{"kty": "XYZ"}]},
              "too_large": b" " * (65 * 1024)}
    if outage == "http_503":
        idp.set_route("/keys", status=503, body=b"down")
    elif outage == "hangs":
        idp.set_route("/keys", body=jwks_document(k1), delay_s=5)
    else:
        idp.set_route("/keys", body=bodies[outage])
    attempts = source.attempts
    assert wait_until(lambda: source.attempts >= attempts + 2)  # two failed refetches at least
    assert source.last_error is not None

    assert source.keyset is good_keys
    assert setup.decide(sign_token(k1, standard_claims(ISSUER))).allowed


def test_first_fetch_failure_then_retry(idp: LocalHttpServer, k1: SigningKey,
                                        make_setup: Callable[..., Setup]) -> None:
    idp.set_route("/keys", status=503, body=b"starting")
    setup = make_setup([ra("jwt", ISSUER, jwksUri=idp.url("/keys")), ALLOW_PUBLIC], JwksSettings())
    source = setup.source(idp.url("/keys"))
    assert source.wait_attempted(BOUNDED_WAIT_S)

    token = sign_token(k1, standard_claims(ISSUER))
    rejected = setup.decide(token)
    assert (rejected.http_status, rejected.body) == (401, "Jwks remote fetch is failed")
    assert setup.decide(None, "/public").allowed  # requests without a token follow the policy
    assert setup.decide(None, "/private").reason == "no_allow_policy_matched"

    idp.set_route("/keys", body=jwks_document(k1))
    assert wait_until(lambda: source.keyset is not None)  # the retry with back-off brings the keys
    assert setup.decide(token).allowed
    assert idp.hits("/keys") == source.attempts


def test_hanging_source_delays_nothing(idp: LocalHttpServer, k1: SigningKey, k2: SigningKey,
                                       make_setup: Callable[..., Setup]) -> None:
    idp.set_route("/slow", body=jwks_document(k1), delay_s=30)
    idp.set_route("/fast", body=jwks_document(k2))
    setup = make_setup([ra("slow", "https://slow.test", jwksUri=idp.url("/slow")),
                        ra("fast", "https://fast.test", jwksUri=idp.url("/fast"))],
                       JwksSettings(fetch_timeout_s=60, kid_refresh_wait_s=0.1))
    slow, fast = setup.source(idp.url("/slow")), setup.source(idp.url("/fast"))

    assert fast.wait_attempted(BOUNDED_WAIT_S)
    assert setup.decide(sign_token(k2, standard_claims("https://fast.test"))).allowed
    decision = setup.decide(sign_token(k1, standard_claims("https://slow.test")))
    assert decision.body == "Jwks remote fetch is failed"
    # Both decisions were returned while the slow identity provider still keeps its first request open.
    assert idp.hits("/slow") == 1
    assert not slow.wait_attempted(0)


def test_openid_discovery_finds_keys(idp: LocalHttpServer, k1: SigningKey,
                                     make_setup: Callable[..., Setup]) -> None:
    issuer = idp.url("/realms/demo")
    idp.set_route("/realms/demo/.well-known/openid-configuration",
                  body={"issuer": issuer, "jwks_uri": idp.url("/realms/demo/certs")})
    idp.set_route("/realms/demo/certs", body=jwks_document(k1))
    setup = make_setup([ra("jwt", issuer)], JwksSettings())
    (source,) = setup.sources.values()
    assert source.wait_attempted(BOUNDED_WAIT_S)
    assert setup.decide(sign_token(k1, standard_claims(issuer))).allowed
    assert idp.hits("/realms/demo/.well-known/openid-configuration") == 1
    assert idp.hits("/realms/demo/certs") == 1


def test_bad_key_skipped_good_key_served(idp: LocalHttpServer, k1: SigningKey, make_setup: Callable[..., Setup],
                                         caplog: pytest.LogCaptureFixture) -> None:
    broken = {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"}
    idp.set_route("/keys", body={"keys": [broken, k1.public_jwk()]})
    with caplog.at_level(logging.WARNING, logger="extauthz.jwks"):
        setup = make_setup([ra("jwt", ISSUER, jwksUri=idp.url("/keys"))], JwksSettings())
        assert setup.source(idp.url("/keys")).wait_attempted(BOUNDED_WAIT_S)
    assert setup.decide(sign_token(k1, standard_claims(ISSUER))).allowed
    assert any("'broken'" in record.getMessage() for record in caplog.records)


def test_fetched_oct_key_not_used(idp: LocalHttpServer, make_setup: Callable[..., Setup]) -> None:
    import jwt as pyjwt

    secret_jwk = {"kty": "oct", "kid": "s", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA"}
    idp.set_route("/keys", body={"keys": [secret_jwk]})
    setup = make_setup([ra("remote", ISSUER, jwksUri=idp.url("/keys")),
                        ra("inline", "https://inline.test", jwks=json.dumps({"keys": [secret_jwk]}))],
                       JwksSettings())
    assert setup.source(idp.url("/keys")).wait_attempted(BOUNDED_WAIT_S)
    secret = b"secret-secret-secret-secret-secret"
    remote = pyjwt.encode(standard_claims(ISSUER), secret, algorithm="HS256", headers={"kid": "s"})
    inline = pyjwt.encode(standard_claims("https://inline.test"), secret, algorithm="HS256", headers={"kid": "s"})
    assert setup.decide(remote).body == "Jwks remote fetch is failed"  # the set had no usable key
    assert setup.decide(inline).allowed


def test_token_cache_never_outlives_exp(idp: LocalHttpServer, k1: SigningKey,
                                        make_setup: Callable[..., Setup]) -> None:
    now = [time.time()]
    idp.set_route("/keys", body=jwks_document(k1))
    setup = make_setup([ra("jwt", ISSUER, jwksUri=idp.url("/keys"))], JwksSettings(), clock=lambda: now[0])
    assert setup.source(idp.url("/keys")).wait_attempted(BOUNDED_WAIT_S)
    token = sign_token(k1, {**standard_claims(ISSUER), "exp": int(now[0]) + 10})

    assert setup.decide(token).allowed
    assert setup.decide(token).allowed
    assert setup.authorizer.token_cache_hits == 1
    now[0] += 10 + 59  # still within the 60 s clock skew
    assert setup.decide(token).allowed
    assert setup.authorizer.token_cache_hits == 2
    now[0] += 2
    expired = setup.decide(token)
    assert (expired.http_status, expired.body) == (401, "Jwt is expired")
    assert setup.authorizer.token_cache_hits == 2


def test_token_cache_emptied_by_rotation(idp: LocalHttpServer, k1: SigningKey, k2: SigningKey,
                                         make_setup: Callable[..., Setup]) -> None:
    idp.set_route("/keys", body=jwks_document(k1))
    setup = make_setup([ra("jwt", ISSUER, jwksUri=idp.url("/keys"))],
                       JwksSettings(kid_cooldown_s=0.01, kid_refresh_wait_s=5))
    source = setup.source(idp.url("/keys"))
    assert source.wait_attempted(BOUNDED_WAIT_S)
    old_token = sign_token(k1, standard_claims(ISSUER))
    assert setup.decide(old_token).allowed
    assert setup.decide(old_token).allowed
    hits_before = setup.authorizer.token_cache_hits

    idp.set_route("/keys", body=jwks_document(k2))  # k1 is withdrawn
    assert setup.decide(sign_token(k2, standard_claims(ISSUER))).allowed  # its kid triggers the refetch
    rejected = setup.decide(old_token)
    assert not rejected.allowed
    assert rejected.reason == "jwks_no_matching_key"
    assert setup.authorizer.token_cache_hits == hits_before


class RecordingFetcher(HttpFetcher):
    """The real HTTP fetcher, noting which thread each fetch ran on."""

    def __init__(self) -> None:
        self.threads: list[str] = []
        self._lock = threading.Lock()

    def fetch(self, url: str, timeout: float, max_bytes: int) -> bytes:
        with self._lock:
            self.threads.append(threading.current_thread().name)
        return super().fetch(url, timeout, max_bytes)


def test_checks_never_fetch_keys(idp: LocalHttpServer, k1: SigningKey, k2: SigningKey, tmp_path: Path) -> None:
    idp.set_route("/keys", body=jwks_document(k1))
    policy = ra("jwt", ISSUER, jwksUri=idp.url("/keys"))
    policy["metadata"]["namespace"] = "demo"
    (tmp_path / "ra.yaml").write_text(json.dumps(policy))
    fetcher = RecordingFetcher()
    server = ExtAuthzServer(ServeConfig(policies=tmp_path, listen="127.0.0.1:0", watch=False,
                                        jwks_kid_cooldown_s=0.01, jwks_kid_refresh_wait_s=1), fetcher=fetcher)
    server.start()
    try:
        address = f"127.0.0.1:{server.port}"
        idp.set_route("/keys", body=jwks_document(k1, k2))
        for key in (k1, k2, k1):
            token = sign_token(key, standard_claims(ISSUER))
            response = send_check(address, build_check_request(headers={"authorization": f"Bearer {token}"}))
            assert response.status.code == 0, response.denied_response.body
        unknown = sign_token(k1, standard_claims(ISSUER), kid="nope")
        send_check(address, build_check_request(headers={"authorization": f"Bearer {unknown}"}))
    finally:
        server.stop(0)
    assert len(fetcher.threads) >= 2
    assert all(name.startswith("jwks-refresh") for name in fetcher.threads), fetcher.threads
