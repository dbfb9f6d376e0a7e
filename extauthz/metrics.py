"""Prometheus metrics and the HTTP listener that serves them with /healthz and /readyz.

With several worker processes, each worker writes its samples to files in
PROMETHEUS_MULTIPROC_DIR and the supervisor serves their sum. prometheus-client
chooses that mode when the metric objects are created, so the supervisor sets the
variable before any worker starts and this module is imported after it.
"""

from __future__ import annotations

import http.server
import logging
import os
import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

logger = logging.getLogger("extauthz.metrics")

MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR" in os.environ

DECISIONS = Counter("extauthz_decisions_total", "Check decisions by outcome and reason code",
                    ["decision", "reason"])
CHECK_DURATION = Histogram(
    "extauthz_check_duration_seconds", "Time to decide one Check, inside the service",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
DRY_RUN_RESULTS = Counter("extauthz_dry_run_results_total",
                          "Shadow results of istio.io/dry-run AuthorizationPolicies", ["result"])
RELOADS = Counter("extauthz_policy_reloads_total", "Policy directory reloads by outcome", ["outcome"])
REVISION = Gauge("extauthz_policy_revision_info", "The policy revision being served (value 1)", ["revision"],
                 multiprocess_mode="liveall")
JWKS_FETCHES = Counter("extauthz_jwks_fetches_total", "JWKS fetches by key source and outcome",
                       ["source", "outcome"])
JWKS_LAST_SUCCESS = Gauge("extauthz_jwks_last_success_timestamp_seconds",
                          "Unix time of the last good fetch of each key source; its age is time() minus this",
                          ["source"], multiprocess_mode="max")
TOKEN_CACHE = Counter("extauthz_token_cache_lookups_total", "Verified-token cache lookups by result", ["result"])
# Children used on every Check, looked up once: `labels()` validates and locks on each call.
TOKEN_CACHE_HIT = TOKEN_CACHE.labels("hit")
TOKEN_CACHE_MISS = TOKEN_CACHE.labels("miss")
_decision_children: dict[tuple[str, str], Counter] = {}


def count_decision(decision: str, reason: str, duration_s: float) -> None:
    child = _decision_children.get((decision, reason))
    if child is None:
        child = _decision_children.setdefault((decision, reason), DECISIONS.labels(decision, reason))
    child.inc()
    CHECK_DURATION.observe(duration_s)


READY = Gauge("extauthz_ready", "1 while the process serves a loaded policy revision", multiprocess_mode="liveall")

_revision: list[str] = []  # the revision this process serves, once one is loaded


def set_revision(revision: str) -> None:
    """Mark `revision` as served (1) and the previous one as no longer served (0).

    The old series stays at 0 instead of being removed, because prometheus-client cannot
    remove labels in multiprocess mode.
    """
    if _revision:
        REVISION.labels(_revision[0]).set(0)
        _revision.clear()
    REVISION.labels(revision).set(1)
    _revision.append(revision)


def registry() -> CollectorRegistry:
    if MULTIPROCESS:
        collected = CollectorRegistry()
        multiprocess.MultiProcessCollector(collected)
        return collected
    from prometheus_client import REGISTRY

    return REGISTRY


def mark_process_dead(pid: int) -> None:
    """Drop the live gauges of a worker that exited, so readiness reflects live workers only."""
    if MULTIPROCESS:
        multiprocess.mark_process_dead(pid)


class MetricsServer:
    """Serve /metrics, /healthz (the process runs) and /readyz (policies loaded, not draining)."""

    def __init__(self, listen: str, is_ready: Callable[[], bool]) -> None:
        host, _, port = listen.rpartition(":")
        is_ready_check = is_ready

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(registry()), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b"ok\n", "text/plain")
                elif path == "/readyz":
                    ready = is_ready_check()
                    self._send(200 if ready else 503, b"ready\n" if ready else b"not ready\n", "text/plain")
                else:
                    self._send(404, b"not found: use /metrics, /healthz or /readyz\n", "text/plain")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                logger.debug("metrics request: " + format, *args)

        # An empty host means every interface, as in --listen.
        bind_host = host.strip("[]") or "0.0.0.0"  # noqa: S104
        self._server = http.server.ThreadingHTTPServer((bind_host, int(port)), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()
        host = self._server.server_address[0]
        logger.info("metrics on http://%s:%d (/metrics, /healthz, /readyz)", host, self.port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def ready_from_workers() -> bool:
    """Return whether every live worker reports ready, from the multiprocess files.

    The supervisor's own sample is left out: it serves no Checks.
    """
    own_pid = str(os.getpid())
    for metric in registry().collect():
        if metric.name == "extauthz_ready":
            values = [sample.value for sample in metric.samples if sample.labels.get("pid") != own_pid]
            return bool(values) and min(values) >= 1
    return False
