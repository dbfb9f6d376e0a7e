"""Load the policy directory and keep serving the newest valid revision.

A new revision is read, validated and compiled completely, its key sources are started,
and only then is it swapped in with one assignment, so a Check uses one revision from
start to end. Any error keeps the previous revision serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import watchfiles

from extauthz import metrics
from extauthz.engine import Authorizer, PolicySnapshot
from extauthz.errors import PolicyError
from extauthz.jwks import JwksCache
from extauthz.policy import compile_policy_files, read_policy_files, revision_of

logger = logging.getLogger("extauthz.reload")

RESCAN_INTERVAL_MS = 10_000  # a full re-read also runs this often, in case a file event is missed
RETRY_WATCH_S = 1.0
SETTLE_S = 0.05  # files must read the same twice this far apart, so a write in progress is not loaded
MAX_SETTLE_ROUNDS = 20


class PolicyReloader:
    def __init__(
        self,
        directory: Path,
        authorizer: Authorizer,
        jwks: JwksCache,
        root_namespace: str,
        startup_timeout_s: float,
        on_loaded: Callable[[str], None] = lambda revision: None,
    ) -> None:
        self.directory = directory
        self.authorizer = authorizer
        self.jwks = jwks
        self.root_namespace = root_namespace
        self.startup_timeout_s = startup_timeout_s
        self.on_loaded = on_loaded
        self.revision: str | None = None
        self.last_error: str | None = None
        self.reloads = 0
        self._seen_revision: str | None = None  # last revision tried, valid or not
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reload(self) -> bool:
        """Re-read the directory; returns True when a new revision was swapped in."""
        with self._lock:
            return self._reload_locked()

    def _reload_locked(self) -> bool:
        fallback = f"keeping revision {self.revision}" if self.revision else "no revision is serving yet"
        try:
            contents = self._read_settled()
        except PolicyError as exc:
            self._report(exc, fallback)
            self._seen_revision = None
            return False

        revision = revision_of(contents, self.directory)
        if revision == self._seen_revision:
            return False  # same content: a touch or a rewrite with the same bytes
        self._seen_revision = revision
        if revision == self.revision:
            # Back to the content being served, after a rejected change: nothing to swap.
            logger.info("policy directory is back to revision %s, which is still serving", revision)
            self.last_error = None
            return False

        try:
            policy_set = compile_policy_files(contents, revision)
        except PolicyError as exc:
            metrics.RELOADS.labels("rejected").inc()
            self._report(exc, fallback, revision)
            return False
        for warning in policy_set.warnings:
            logger.warning("%s", warning)

        started = self.jwks.update(policy_set.inline_jwks, policy_set.remote_jwks)
        deadline = time.monotonic() + self.startup_timeout_s
        for source in started:
            # Wait until each new key source was tried once, so that a new revision does
            # not reject tokens only because its keys are still on their way.
            source.wait_attempted(max(0.0, deadline - time.monotonic()))

        self.authorizer.snapshot = PolicySnapshot(policy_set, self.root_namespace)
        previous = self.revision
        self.revision = revision
        self.last_error = None
        self.reloads += 1
        metrics.RELOADS.labels("loaded").inc()
        metrics.set_revision(revision)
        logger.info(
            "loaded policy revision %s from %d file(s): %d RequestAuthentication, %d AuthorizationPolicy%s",
            revision, len(policy_set.files), len(policy_set.request_authentications),
            len(policy_set.authorization_policies), f" (replaces {previous})" if previous else "",
        )
        self.on_loaded(revision)
        return True

    def _read_settled(self) -> list[tuple[str, bytes]]:
        """Read the files until two reads agree, so that a half-written file is not compiled.

        NOTE: a writer that pauses longer than SETTLE_S in the middle of a file can still be
        read half-way. Writing a temporary file and renaming it, as Kubernetes does, avoids that.
        """
        contents = read_policy_files(self.directory)
        for _ in range(MAX_SETTLE_ROUNDS):
            self._stop.wait(SETTLE_S)
            again = read_policy_files(self.directory)
            if again == contents:
                break
            contents = again
        return contents

    def _report(self, exc: PolicyError, fallback: str, revision: str | None = None) -> None:
        errors = [p for p in exc.problems if p.severity == "error"]
        message = str(errors[0]) if errors else str(exc)
        if message == self.last_error and revision is None:
            return  # the same unreadable directory again: logged once already
        self.last_error = message
        subject = f"policy revision {revision}" if revision else f"policy directory {self.directory}"
        logger.error("%s rejected with %d error(s); %s", subject, len(errors), fallback)
        for problem in exc.problems:
            logger.error("%s", problem)

    def start_watching(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="policy-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.is_set():
            if not self.directory.is_dir():
                self.reload()  # logs the missing directory once and keeps the revision
                self._stop.wait(RETRY_WATCH_S)
                continue
            self.reload()  # picks up what changed while nothing watched, such as a re-created directory
            try:
                # Every event, whatever its kind, leads to a full re-read: the content hash
                # decides whether a new revision exists. That also catches the atomic
                # `..data` symlink swap of Kubernetes ConfigMap volumes.
                for _changes in watchfiles.watch(
                    self.directory, watch_filter=None, recursive=True, stop_event=self._stop,
                    rust_timeout=RESCAN_INTERVAL_MS, yield_on_timeout=True, debounce=200, step=50,
                ):
                    self.reload()
                    if not self.directory.is_dir():
                        break
            except Exception as exc:  # the watched directory vanished, or inotify failed
                logger.warning("watching %s stopped: %s; retrying", self.directory, exc)
                self.reload()
                self._stop.wait(RETRY_WATCH_S)
