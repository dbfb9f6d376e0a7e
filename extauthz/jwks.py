"""The JWKS key cache: key sets fetched in the background, served from memory.

Checks never do network I/O. Each remote key source (a `jwksUri`, or OpenID discovery
from the issuer) has its own refresher thread, so a slow or failing identity provider
never delays another one. A failed fetch keeps the last good key set. A token whose
`kid` is not in the cached set triggers one early refetch, at most once per cooldown for
all requests together, and waits for it no longer than a short bound.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass

from extauthz import __version__, metrics
from extauthz.config import (
    DEFAULT_FETCH_TIMEOUT_S,
    DEFAULT_KID_COOLDOWN_S,
    DEFAULT_KID_REFRESH_WAIT_S,
    DEFAULT_MAX_JWKS_BYTES,
    DEFAULT_REFRESH_INTERVAL_S,
)
from extauthz.errors import JwksFetchError
from extauthz.keys import Jwk, parse_jwks
from extauthz.policy.model import InlineJwks, RemoteJwks

logger = logging.getLogger("extauthz.jwks")

RETRY_INITIAL_S = 1.0
RETRY_MAX_S = 60.0
REFRESH_JITTER = 0.1  # +-10 % so that several replicas do not refetch in step


class HttpFetcher:
    """Fetch a URL over HTTP or HTTPS with a timeout and a size limit."""

    def fetch(self, url: str, timeout: float, max_bytes: int) -> bytes:
        # Policy validation admits only http:// and https:// URLs here.
        headers = {"User-Agent": f"extauthz/{__version__}", "Accept": "application/json"}
        request = urllib.request.Request(url, headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                body: bytes = response.read(max_bytes + 1)
        except urllib.error.HTTPError as exc:
            raise JwksFetchError(f"GET {url} returned HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise JwksFetchError(f"GET {url} failed: {reason}") from None
        if len(body) > max_bytes:
            raise JwksFetchError(f"GET {url} returned more than {max_bytes} bytes; raise --jwks-max-bytes if "
                                 "the key set is really that large")
        return body


@dataclass(frozen=True)
class KeySet:
    """The keys of one source at one point in time."""

    keys: tuple[Jwk, ...]
    fetched_at: float  # time.monotonic()
    generation: int

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(k.kid for k in self.keys if k.kid)


@dataclass(frozen=True)
class JwksSettings:
    refresh_interval_s: float = DEFAULT_REFRESH_INTERVAL_S
    kid_cooldown_s: float = DEFAULT_KID_COOLDOWN_S
    kid_refresh_wait_s: float = DEFAULT_KID_REFRESH_WAIT_S
    max_bytes: int = DEFAULT_MAX_JWKS_BYTES
    fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S


class RemoteKeySource:
    """One remote key source and the thread that keeps it fresh."""

    def __init__(self, spec: RemoteJwks, fetcher: HttpFetcher, settings: JwksSettings) -> None:
        self.spec = spec
        self._fetcher = fetcher
        self._settings = settings
        self.keyset: KeySet | None = None
        self.last_error: str | None = None
        self.attempts = 0
        self.kid_refreshes = 0
        self._attempted = threading.Event()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._last_kid_refresh_at = -float("inf")
        self._refresh_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"jwks-refresh {spec.url}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def wait_attempted(self, timeout: float) -> bool:
        return self._attempted.wait(timeout)

    def request_refresh(self) -> bool:
        """Ask for an early fetch; returns False while the cooldown since the last such request runs.

        Scheduled fetches do not start the cooldown, so the first token signed with a
        newly rotated key triggers its refetch at once.
        """
        with self._refresh_lock:
            now = time.monotonic()
            if now - self._last_kid_refresh_at < self._settings.kid_cooldown_s:
                return False
            # Claim the slot under the lock, so concurrent unknown-kid requests trigger once.
            self._last_kid_refresh_at = now
        self.kid_refreshes += 1
        self._wake.set()
        return True

    def wait_for_generation_after(self, generation: int, timeout: float) -> KeySet | None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                current = self.keyset
                if current is not None and current.generation > generation:
                    return current
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return current
                self._changed.wait(remaining)

    def _run(self) -> None:
        retry_delay = RETRY_INITIAL_S
        while not self._stop.is_set():
            ok = self._fetch_once()
            self._attempted.set()
            if ok:
                retry_delay = RETRY_INITIAL_S
                interval = self._settings.refresh_interval_s
                delay = interval * random.uniform(1 - REFRESH_JITTER, 1 + REFRESH_JITTER)  # noqa: S311 (jitter, not a secret)
            else:
                delay = min(retry_delay, self._settings.refresh_interval_s)
                retry_delay = min(retry_delay * 2, RETRY_MAX_S)
            self._wake.wait(delay)
            self._wake.clear()

    def _fetch_once(self) -> bool:
        self.attempts += 1
        spec = self.spec
        try:
            keys = self._download()
        except JwksFetchError as exc:
            metrics.JWKS_FETCHES.labels(spec.url, "error").inc()
            self.last_error = str(exc)
            logger.warning("JWKS fetch failed (attempt %d): %s; %s", self.attempts, exc, self._fallback())
            return False
        if not keys:
            metrics.JWKS_FETCHES.labels(spec.url, "no_usable_key").inc()
            self.last_error = f"JWKS from {spec.url} has no usable key"
            logger.warning("%s; %s", self.last_error, self._fallback())
            return False
        previous = self.keyset
        with self._changed:
            self.keyset = KeySet(keys, time.monotonic(), (previous.generation + 1) if previous else 1)
            self.last_error = None
            self._changed.notify_all()
        metrics.JWKS_FETCHES.labels(spec.url, "success").inc()
        metrics.JWKS_LAST_SUCCESS.labels(spec.url).set(time.time())
        logger.info("JWKS fetched from %s: %d key(s), kids %s", spec.url, len(keys),
                    sorted(k.kid for k in keys if k.kid) or "none")
        return True

    def _timeout(self) -> float:
        return self.spec.timeout_s or self._settings.fetch_timeout_s

    def _fallback(self) -> str:
        if self.keyset is not None:
            return "keeping the last good key set"
        return "tokens of this source are rejected until a fetch succeeds"

    def _download(self) -> tuple[Jwk, ...]:
        spec = self.spec
        url = spec.url
        if spec.discovery:
            url = self._discover(url)
        body = self._fetcher.fetch(url, self._timeout(), self._settings.max_bytes)
        return parse_jwks(body, url)

    def _discover(self, discovery_url: str) -> str:
        body = self._fetcher.fetch(discovery_url, self._timeout(), self._settings.max_bytes)
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise JwksFetchError(f"OpenID configuration at {discovery_url} is not valid JSON") from None
        jwks_uri = document.get("jwks_uri") if isinstance(document, dict) else None
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("http://", "https://")):
            raise JwksFetchError(f"OpenID configuration at {discovery_url} has no http(s) jwks_uri")
        return jwks_uri


class JwksCache:
    """Key sets by key source, for every rule of the active policy revision."""

    def __init__(self, fetcher: HttpFetcher | None = None, settings: JwksSettings | None = None) -> None:
        self._fetcher = fetcher or HttpFetcher()
        self.settings = settings or JwksSettings()
        self._inline: dict[str, KeySet] = {}
        self._remote: dict[str, RemoteKeySource] = {}
        self._lock = threading.Lock()

    def update(self, inline: Iterable[InlineJwks], remote: Iterable[RemoteJwks]) -> list[RemoteKeySource]:
        """Match the sources to a new policy revision; returns sources started by this call.

        Sources that stay keep their keys and their thread; removed ones stop.
        """
        inline_sets = {}
        for item in inline:
            known = self._inline.get(item.key_source)
            if known is None:
                try:
                    keys = parse_jwks(item.text, f"inline jwks of {item.origin}", allow_oct=True)
                except JwksFetchError as exc:  # validated at load; kept for safety
                    logger.error("%s", exc)
                    keys = ()
                known = KeySet(keys, time.monotonic(), 1)
            inline_sets[item.key_source] = known
        started = []
        with self._lock:
            self._inline = inline_sets
            configured = {spec.key_source: spec for spec in remote}
            for key, source in list(self._remote.items()):
                if key not in configured:
                    source.stop()
                    del self._remote[key]
            for key, spec in configured.items():
                if key not in self._remote:
                    source = RemoteKeySource(spec, self._fetcher, self.settings)
                    self._remote[key] = source
                    source.start()
                    started.append(source)
        return started

    def keyset(self, key_source: str) -> KeySet | None:
        inline = self._inline.get(key_source)
        if inline is not None:
            return inline
        remote = self._remote.get(key_source)
        return remote.keyset if remote is not None else None

    def is_remote(self, key_source: str) -> bool:
        return key_source in self._remote

    def refresh_for_unknown_kid(self, key_source: str, known: KeySet | None) -> KeySet | None:
        """Trigger a rate-limited refetch and wait briefly for it; returns the newest key set."""
        remote = self._remote.get(key_source)
        if remote is None:
            return known
        if remote.request_refresh():
            generation = known.generation if known else 0
            return remote.wait_for_generation_after(generation, self.settings.kid_refresh_wait_s)
        return remote.keyset

    def sources(self) -> list[RemoteKeySource]:
        with self._lock:
            return list(self._remote.values())

    def close(self) -> None:
        with self._lock:
            for source in self._remote.values():
                source.stop()
            self._remote.clear()
