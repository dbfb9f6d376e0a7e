"""Markdown helpers and the scan of server logs for problems."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

# Log lines that point to a product problem: the error and warning levels of extauthz and
# Envoy, grpc core's lines that start with E, W or F and the date (as "E1204 12:00:00.000000"),
# and Python tracebacks.
PROBLEM_LINE = re.compile(r"\b(ERROR|WARNING|CRITICAL)\b|\[(error|warning|critical)\]|Traceback|^[EWF]\d{4} \d")
MAX_REPORTED_LINES = 5


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return "\n".join(lines)


def log_problems(name: str, log_path: Path, ignored: Sequence[str] = ()) -> list[str]:
    """Return a finding per error or warning line of a server log, at most MAX_REPORTED_LINES.

    The file is read line by line because extauthz logs one line per decision at INFO, so
    a log of a benchmark run contains hundreds of thousands of lines. Lines containing one of
    `ignored` are known to be harmless and skipped.
    """
    lines = []
    try:
        with open(log_path, encoding="utf-8", errors="replace") as log_file:
            for line in log_file:
                if PROBLEM_LINE.search(line) and not any(text in line for text in ignored):
                    lines.append(line.strip())
    except FileNotFoundError:
        return [f"{name}: log file {log_path} is missing"]
    findings = [f"{name} logged: `{line[:300]}`" for line in lines[:MAX_REPORTED_LINES]]
    if len(lines) > MAX_REPORTED_LINES:
        findings.append(f"{name} logged {len(lines) - MAX_REPORTED_LINES} more error or warning lines")
    return findings
