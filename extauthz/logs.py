"""Logging setup and the decision log: one line per Check, in text or JSON.

Redaction happens here, in one place: a decision line carries the path without its
query string and never a header value, so tokens, cookies and authorization headers
cannot reach it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

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


def configure_logging(level: str, log_format: str = "text") -> None:
    """Set up the root handler; called by the command line only."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _text_value(value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\\\n\r\t'):
        return json.dumps(text)
    return text


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
        labels = ",".join(f"{k}={v}" for k, v in sorted(workload.labels))
        fields["workload"] = f"{workload.namespace}/{labels}" if labels else workload.namespace
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


def log_decision(fields: dict[str, Any]) -> None:
    message = " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
    decision_logger.info(message, extra={"fields": fields})
