"""Logging setup and the decision log: one line per Check, in text or JSON.

Redaction happens here, in one place: a decision line carries the path without its
query string and never a header value, so tokens, cookies and authorization headers
cannot reach it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
import threading
import time
from typing import Any, TextIO

from extauthz.decision import Decision
from extauthz.request import RequestContext, Workload

decision_logger = logging.getLogger("extauthz.decision")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; the decision log's fields become top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"), default=str)


FLUSH_INTERVAL_S = 0.2
MAX_BUFFERED_CHARS = 64 * 1024


class DecisionLogWriter:
    """Write decision lines in batches from a background thread.

    A line per Check through the logging module cost about 70 microseconds of CPU in the
    benchmark (record, formatter, lock, one write call each). Here a line is formatted
    with a cached timestamp and appended to a buffer, and the buffer is written at most
    FLUSH_INTERVAL_S later, or at once when it grows past MAX_BUFFERED_CHARS.
    """

    def __init__(self, stream: TextIO, log_format: str) -> None:
        self._stream = stream
        self._json = log_format == "json"
        self._lines: list[str] = []
        self._size = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._second = -1
        self._stamp = ""
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="decision-log", daemon=True)
        self._thread.start()
        atexit.register(self.flush)

    def write(self, decision: Decision, ctx: RequestContext | None, workload: Workload | None,
              decision_id: str, duration_s: float) -> None:
        now = time.time()
        second = int(now)
        milliseconds = int((now - second) * 1000)
        if second != self._second:  # strftime once a second, not once a line
            self._second = second
            if self._json:
                self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            else:
                self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        # The same layout as the other log lines (TEXT_FORMAT and JsonFormatter).
        if self._json:
            fields = decision_fields(decision, ctx, workload, decision_id, duration_s)
            line = json.dumps({"time": f"{self._stamp}.{milliseconds:03d}Z", "level": "INFO",
                               "logger": decision_logger.name, "pid": self._pid, **fields},
                              separators=(",", ":"), default=str)
        else:
            message = decision_text(decision, ctx, workload, decision_id, duration_s)
            line = f"{self._stamp},{milliseconds:03d} INFO {decision_logger.name} [{self._pid}]: {message}"
        with self._lock:
            self._lines.append(line)
            self._size += len(line)
            full = self._size > MAX_BUFFERED_CHARS
        if full:
            self._wake.set()

    def flush(self) -> None:
        with self._lock:
            lines, self._lines, self._size = self._lines, [], 0
        if lines:
            try:
                self._stream.write("\n".join(lines) + "\n")
                self._stream.flush()
            except (OSError, ValueError):  # the stream is closed at interpreter exit
                pass

    def _run(self) -> None:
        while True:
            self._wake.wait(FLUSH_INTERVAL_S)
            self._wake.clear()
            self.flush()


_writer: DecisionLogWriter | None = None


def configure_logging(level: str, log_format: str = "text") -> None:
    """Set up the root handler and the decision log writer; called by the command line only."""
    global _writer
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # watchfiles logs every change at INFO; extauthz logs the reload it causes instead.
    logging.getLogger("watchfiles").setLevel(max(logging.WARNING, root.level))
    if _writer is not None:
        _writer.flush()
    _writer = DecisionLogWriter(sys.stderr, log_format)


def flush_decision_log() -> None:
    if _writer is not None:
        _writer.flush()


_NEEDS_QUOTES = re.compile(r'[\s"=\\]')


def text_message(fields: dict[str, Any]) -> str:
    """Format fields as `key=value` pairs, quoting a value that is empty or has spaces, quotes or `=`."""
    # A single loop without a helper call per value, because this runs once per Check.
    parts = []
    for key, value in fields.items():
        text = value if value.__class__ is str else str(value)
        if not text or _NEEDS_QUOTES.search(text):
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def decision_fields(decision: Decision, ctx: RequestContext | None, workload: Workload | None,
                    decision_id: str, duration_s: float) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "decision_id": decision_id,
        "decision": "allow" if decision.allowed else "deny",
        "reason": decision.reason,
        "status": decision.http_status,
    }
    if ctx is not None:
        fields["method"] = ctx.method
        fields["host"] = ctx.host
        fields["path"] = ctx.path  # normalized and without the query string, which may carry a token
    if workload is not None:
        fields["workload"] = workload_text(workload)
    if decision.policy:
        fields["policy"] = decision.policy
        fields["rule"] = decision.rule
    if decision.principal:
        fields["principal"] = decision.principal
    if decision.shadow:
        fields["dry_run"] = list(decision.shadow)
    if decision.audited:
        fields["audited"] = True
    fields["revision"] = decision.revision
    fields["duration_ms"] = round(duration_s * 1000, 3)
    return fields


def workload_text(workload: Workload) -> str:
    """Return `namespace/key=value,...` with the labels sorted, or the namespace alone."""
    labels = ",".join(f"{k}={v}" for k, v in sorted(workload.labels))
    return f"{workload.namespace}/{labels}" if labels else workload.namespace


WORKLOAD_TEXTS_SIZE = 1024
_quoted_workloads: dict[Workload, str] = {}


def decision_text(decision: Decision, ctx: RequestContext | None, workload: Workload | None,
                  decision_id: str, duration_s: float) -> str:
    """Return `text_message(decision_fields(...))`, built directly when no request value needs quotes.

    This runs once per Check, and in a measurement the direct form took 1.7 µs against 4.4 µs.
    """
    if ctx is None or workload is None or decision.shadow:
        return text_message(decision_fields(decision, ctx, workload, decision_id, duration_s))
    policy = decision.policy or ""
    principal = decision.principal or ""
    if (not (decision_id and ctx.method and ctx.host and decision.revision)
            or _NEEDS_QUOTES.search(f"{decision_id}{ctx.method}{ctx.host}{ctx.path}{policy}{principal}")):
        return text_message(decision_fields(decision, ctx, workload, decision_id, duration_s))
    quoted_workload = _quoted_workloads.get(workload)
    if quoted_workload is None:
        if len(_quoted_workloads) >= WORKLOAD_TEXTS_SIZE:
            _quoted_workloads.clear()
        quoted_workload = text_message({"workload": workload_text(workload)})
        _quoted_workloads[workload] = quoted_workload
    text = (f"decision_id={decision_id} decision={'allow' if decision.allowed else 'deny'} "
            f"reason={decision.reason} status={decision.http_status} method={ctx.method} host={ctx.host} "
            f"path={ctx.path} {quoted_workload}")
    if policy:
        text += f" policy={policy} rule={decision.rule}"
    if principal:
        text += f" principal={principal}"
    if decision.audited:
        text += " audited=True"
    return f"{text} revision={decision.revision} duration_ms={round(duration_s * 1000, 3)}"


def log_decision(decision: Decision, ctx: RequestContext | None, workload: Workload | None,
                 decision_id: str, duration_s: float) -> None:
    """Write one decision line: batched when the command line set up logging, else a log record."""
    if _writer is not None:
        _writer.write(decision, ctx, workload, decision_id, duration_s)
        return
    fields = decision_fields(decision, ctx, workload, decision_id, duration_s)
    decision_logger.info(text_message(fields), extra={"fields": fields})
