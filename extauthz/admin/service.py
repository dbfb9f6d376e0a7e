"""The `extauthz.admin.v1.Admin` gRPC service: Explain, ListPolicies and Status."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import grpc

from extauthz.admin.v1 import admin_pb2, admin_pb2_grpc
from extauthz.decision import denied
from extauthz.explain import RequestDescription, explain
from extauthz.request import InvalidPathError, Workload

if TYPE_CHECKING:
    from extauthz.server import ExtAuthzServer

logger = logging.getLogger("extauthz.admin")

SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name


def _description(message: admin_pb2.RequestDescription) -> RequestDescription:
    return RequestDescription(
        method=message.method or "GET",
        path=message.path or "/",
        host=message.host,
        scheme=message.scheme or "http",
        headers=dict(message.headers),
        token=message.token,
        namespace=message.workload.namespace,
        labels=dict(message.workload.labels),
        source_principal=message.source_principal,
        source_ip=message.source_ip,
        remote_ip=message.remote_ip,
        destination_ip=message.destination_ip,
        destination_port=message.destination_port,
        sni=message.sni,
    )


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, server: ExtAuthzServer) -> None:
        self.server = server

    def Explain(self, request: admin_pb2.ExplainRequest, context: grpc.ServicerContext) -> admin_pb2.ExplainResponse:  # noqa: N802
        description = _description(request.request)
        if not description.namespace:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request.workload.namespace is required")
        try:
            decision, trace = explain(self.server.authorizer, description)
        except InvalidPathError as exc:
            decision, trace = denied("invalid_path"), [f"path rejected: {exc}"]
        return admin_pb2.ExplainResponse(
            allowed=decision.allowed, reason=decision.reason, http_status=decision.http_status,
            body=decision.body, policy=decision.policy or "",
            rule=decision.rule if decision.rule is not None else -1, principal=decision.principal or "",
            revision=decision.revision, trace=trace, headers_to_set=dict(decision.headers_to_set),
            headers_to_remove=list(decision.headers_to_remove),
            query_parameters_to_remove=list(decision.query_parameters_to_remove),
            dry_run=list(decision.shadow), audited=decision.audited,
        )

    def ListPolicies(self, request: admin_pb2.ListPoliciesRequest,  # noqa: N802
                     context: grpc.ServicerContext) -> admin_pb2.ListPoliciesResponse:
        if not request.workload.namespace:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "workload.namespace is required")
        snapshot = self.server.authorizer.snapshot
        if snapshot is None:
            return admin_pb2.ListPoliciesResponse()
        workload = Workload.of(request.workload.namespace, dict(request.workload.labels))
        root = snapshot.root_namespace
        summaries = []
        for ra in snapshot.policy_set.request_authentications:
            if ra.scope.applies_to(workload, root):
                summaries.append(admin_pb2.PolicySummary(kind=ra.ref.kind, namespace=ra.ref.namespace,
                                                         name=ra.ref.name, file=ra.ref.file, line=ra.ref.line))
        for ap in snapshot.policy_set.authorization_policies:
            if ap.scope.applies_to(workload, root):
                summaries.append(admin_pb2.PolicySummary(
                    kind=ap.ref.kind, namespace=ap.ref.namespace, name=ap.ref.name, action=ap.action.value,
                    dry_run=ap.dry_run, file=ap.ref.file, line=ap.ref.line))
        return admin_pb2.ListPoliciesResponse(revision=snapshot.revision, policies=summaries)

    def Status(self, request: admin_pb2.StatusRequest, context: grpc.ServicerContext) -> admin_pb2.StatusResponse:  # noqa: N802
        reloader = self.server.reloader
        now = time.monotonic()
        sources = []
        for source in self.server.jwks.sources():
            keyset = source.keyset
            sources.append(admin_pb2.KeySourceStatus(
                url=source.spec.url, has_keys=keyset is not None, keys=len(keyset.keys) if keyset else 0,
                age_seconds=now - keyset.fetched_at if keyset else 0.0, last_error=source.last_error or "",
                fetch_attempts=source.attempts))
        return admin_pb2.StatusResponse(
            revision=reloader.revision or "", serving=self.server.ready, reloads=reloader.reloads,
            last_reload_error=reloader.last_error or "", key_sources=sources)
