"""Explain decisions: a described request in, the decision and every step of it out.

Shared by `extauthz explain` and the Admin gRPC service, so both describe a request the
same way and return the same trace as DEBUG logging of live Checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from extauthz.decision import Decision
from extauthz.engine import Authorizer
from extauthz.request import RequestContext, Workload, parse_ip, split_path
from extauthz.servicer import SPIFFE_PREFIX

_FIELDS = ("method", "path", "host", "scheme", "headers", "token", "namespace", "labels", "source_principal",
           "source_ip", "remote_ip", "destination_ip", "destination_port", "sni")


@dataclass
class RequestDescription:
    """A request as a user writes it down: the parts policies can match, and its workload."""

    method: str = "GET"
    path: str = "/"
    host: str = ""
    scheme: str = "http"
    headers: dict[str, str] = field(default_factory=dict)
    token: str = ""
    namespace: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    source_principal: str = ""
    source_ip: str = ""
    remote_ip: str = ""
    destination_ip: str = ""
    destination_port: int = 0
    sni: str = ""

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> RequestDescription:
        """Build from parsed JSON; raises ValueError naming an unknown or mistyped field."""
        data = dict(data)
        workload = data.pop("workload", None)
        if workload is not None:  # the Admin API's form: {"workload": {"namespace": ..., "labels": ...}}
            if not isinstance(workload, dict) or set(workload) - {"namespace", "labels"}:
                raise ValueError("workload must be an object with namespace and labels")
            data.setdefault("namespace", workload.get("namespace", ""))
            data.setdefault("labels", workload.get("labels", {}))
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}; known fields: {', '.join(_FIELDS)}")
        description = cls()
        for name, value in data.items():
            if name in ("headers", "labels"):
                if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                    raise ValueError(f"{name} must be an object of strings")
                setattr(description, name, {str(k): v for k, v in value.items()})
            elif name == "destination_port":
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ValueError("destination_port must be a number")
                description.destination_port = value
            else:
                if not isinstance(value, str):
                    raise ValueError(f"{name} must be a string")
                setattr(description, name, value)
        return description

    def workload(self) -> Workload:
        return Workload.of(self.namespace, self.labels)

    def context(self) -> RequestContext:
        """Build the request attributes; raises InvalidPathError for a path Envoy rejects."""
        headers = {name.lower(): value for name, value in self.headers.items()}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        path, query = split_path(self.path or "/")
        source_ip = parse_ip(self.source_ip)
        principal = self.source_principal.removeprefix(SPIFFE_PREFIX)
        return RequestContext(
            method=self.method or "GET",
            path=path,
            raw_path=self.path or "/",
            query=query,
            host=self.host,
            scheme=self.scheme or "http",
            headers=headers,
            source_principal=principal or None,
            source_ip=source_ip,
            remote_ip=parse_ip(self.remote_ip) or source_ip,
            destination_ip=parse_ip(self.destination_ip),
            destination_port=self.destination_port or None,
            sni=self.sni or None,
        )


def explain(authorizer: Authorizer, description: RequestDescription) -> tuple[Decision, list[str]]:
    """Decide a described request and return the decision with its trace."""
    trace: list[str] = []
    decision = authorizer.decide(description.context(), description.workload(), trace)
    verdict = "ALLOW" if decision.allowed else f"DENY {decision.http_status}"
    summary = f"decision: {verdict} (reason {decision.reason})"
    if decision.policy:
        summary += f" by {decision.policy} rules[{decision.rule}]"
    trace.append(summary)
    return decision, trace
