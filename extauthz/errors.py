"""The exception tree shared by configuration, policy, token and key-fetch code."""

from __future__ import annotations

from dataclasses import dataclass


class ExtAuthzError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(ExtAuthzError):
    """An invalid command-line flag or environment variable."""


@dataclass(frozen=True)
class Problem:
    """One finding of policy validation, located in a file."""

    file: str
    line: int
    message: str
    severity: str = "error"  # "error" rejects the policy set, "warning" only informs

    def __str__(self) -> str:
        prefix = "" if self.severity == "error" else "warning: "
        location = f"{self.file}:{self.line}" if self.line else self.file
        return f"{location}: {prefix}{self.message}"


class PolicyError(ExtAuthzError):
    """A policy set that cannot be served; `problems` lists every error found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class JwksFetchError(ExtAuthzError):
    """A JWKS or OpenID discovery document could not be fetched or parsed."""
