"""The gRPC server: Authorization, health and reflection on one port, plus the background work."""

from __future__ import annotations

import logging
import time
from concurrent import futures
from pathlib import Path

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from extauthz import metrics
from extauthz.admin.service import SERVICE_NAME as ADMIN_SERVICE
from extauthz.admin.service import AdminServicer
from extauthz.admin.v1 import admin_pb2_grpc
from extauthz.config import ServeConfig
from extauthz.engine import Authorizer
from extauthz.errors import ConfigError
from extauthz.executor import HandlerExecutor
from extauthz.jwks import HttpFetcher, JwksCache
from extauthz.logs import flush_decision_log
from extauthz.reload import PolicyReloader
from extauthz.servicer import AuthorizationServicer, CheckSettings

logger = logging.getLogger("extauthz.server")

AUTHORIZATION_SERVICE = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
HEALTH_SERVICES = ("", AUTHORIZATION_SERVICE)
DRAIN_POLL_S = 0.02
# After a connection reached its maximum age, its in-flight calls get this long to finish.
CONNECTION_AGE_GRACE_S = 5.0


def _connection_age_options(age_s: float) -> list[tuple[str, int]]:
    """Return the grpcio options that recycle client connections after `age_s` seconds (none for 0)."""
    if age_s <= 0:
        return []
    return [("grpc.max_connection_age_ms", max(1, round(age_s * 1000))),
            ("grpc.max_connection_age_grace_ms", round(CONNECTION_AGE_GRACE_S * 1000))]


def _read_pem(path: Path, flag: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{flag} {path} is not a PEM file")
    return data


def server_credentials(config: ServeConfig) -> grpc.ServerCredentials | None:
    """Build TLS credentials from the flags; raises ConfigError, never falls back to plaintext."""
    if config.tls_cert is None and config.tls_key is None:
        if config.tls_client_ca is not None:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    certificate = _read_pem(config.tls_cert, "--tls-cert")
    key = _read_pem(config.tls_key, "--tls-key")
    client_ca = _read_pem(config.tls_client_ca, "--tls-client-ca") if config.tls_client_ca else None
    try:
        return grpc.ssl_server_credentials([(key, certificate)], root_certificates=client_ca,
                                           require_client_auth=client_ca is not None)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"invalid TLS certificate or key: {exc}") from None


class ExtAuthzServer:
    """Serve Check for the policies of one directory; `start()` returns once it listens."""

    def __init__(self, config: ServeConfig, fetcher: HttpFetcher | None = None) -> None:
        self.config = config
        self.jwks = JwksCache(fetcher, config.jwks_settings())
        self.authorizer = Authorizer(self.jwks)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.reloader = PolicyReloader(
            config.policies, self.authorizer, self.jwks, config.root_namespace,
            config.startup_timeout_s, on_loaded=self._on_loaded,
        )
        self.servicer = AuthorizationServicer(self.authorizer, CheckSettings(
            config.workload_namespace, dict(config.workload_labels), config.xff_num_trusted_hops))
        self._server: grpc.Server | None = None
        self._executor: HandlerExecutor | None = None
        self._metrics: metrics.MetricsServer | None = None
        self._admin: grpc.Server | None = None
        self.port = 0
        self.admin_port = 0
        self.ready = False

    def start(self) -> None:
        """Bind, load the policies, start watching; raises ConfigError when it cannot listen."""
        credentials = server_credentials(self.config)  # first: a bad certificate starts nothing
        for service in HEALTH_SERVICES:
            self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        metrics.READY.set(0)

        if self.config.metrics_listen:
            try:
                self._metrics = metrics.MetricsServer(self.config.metrics_listen, lambda: self.ready)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot listen on {self.config.metrics_listen} for metrics: {exc}; "
                                  "choose a free HOST:PORT with --metrics-listen") from None
            self._metrics.start()

        self._executor = HandlerExecutor(self.config.threads, "check")
        server = grpc.server(
            self._executor,  # type: ignore[arg-type]
            options=[
                # Without worker processes, a second server on the same port must fail
                # instead of silently sharing it, as grpcio does by default on Linux.
                ("grpc.so_reuseport", 1 if self.config.reuse_port else 0),
                ("grpc.max_concurrent_streams", self.config.max_concurrent_streams),
                *_connection_age_options(self.config.max_connection_age_s),
            ],
        )
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        services = [AUTHORIZATION_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME]
        if self.config.admin_listen is None:
            admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(self), server)
            services.append(ADMIN_SERVICE)
        reflection.enable_server_reflection(services, server)

        try:
            port = self._bind(server, credentials)
        except ConfigError:
            if self._metrics is not None:  # nothing else started yet
                self._metrics.stop()
                self._metrics = None
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        self.port = port
        server.start()
        self._server = server
        host = self.config.listen.rsplit(":", 1)[0]
        if credentials is None:
            mode = "plaintext"
        elif self.config.tls_client_ca:
            mode = "mTLS"
        else:
            mode = "TLS"
        logger.info("listening on %s:%d (%s)", host, port, mode)

        if self.config.admin_listen is not None:
            try:
                self._start_admin_server(self.config.admin_listen)
            except ConfigError:
                self.stop(0)
                raise
        self.reloader.reload()
        if self.config.watch:
            self.reloader.start_watching()

    def _bind(self, server: grpc.Server, credentials: grpc.ServerCredentials | None) -> int:
        try:
            if credentials is None:
                port = server.add_insecure_port(self.config.listen)
            else:
                port = server.add_secure_port(self.config.listen, credentials)
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {self.config.listen}: {exc}; choose a free HOST:PORT "
                              "with --listen") from None
        if port == 0:
            raise ConfigError(f"cannot listen on {self.config.listen}; choose a free HOST:PORT with --listen")
        return port

    def _start_admin_server(self, listen: str) -> None:
        admin = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="admin"),
                            options=[("grpc.so_reuseport", 1 if self.config.reuse_port else 0)])
        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(self), admin)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, admin)
        reflection.enable_server_reflection((ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), admin)
        try:
            port = admin.add_insecure_port(listen)
        except RuntimeError:
            port = 0
        if port == 0:
            raise ConfigError(f"cannot listen on {listen} for the Admin service; choose a free HOST:PORT "
                              "with --admin-listen")
        admin.start()
        self._admin = admin
        self.admin_port = port
        logger.info("Admin service on %s:%d (plaintext)", listen.rsplit(":", 1)[0], port)

    def _on_loaded(self, revision: str) -> None:
        if self._server is None:
            return  # stopping: health stays NOT_SERVING
        for service in HEALTH_SERVICES:
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.ready = True
        metrics.READY.set(1)

    def stop(self, grace: float | None = None) -> None:
        """Stop in a fixed order: health NOT_SERVING, watcher and key refreshers, then drain Checks."""
        self.health.enter_graceful_shutdown()
        self.ready = False
        metrics.READY.set(0)
        if self.config.shutdown_delay_s > 0 and self._server is not None:
            logger.info("health is NOT_SERVING; still accepting Checks for %.1fs", self.config.shutdown_delay_s)
            time.sleep(self.config.shutdown_delay_s)
        self.reloader.stop()
        self.jwks.close()
        if self._server is not None:
            server, self._server = self._server, None
            stopped = server.stop(grace)  # refuses new RPCs; running ones get `grace` seconds
            deadline = time.monotonic() + (grace or 0)
            while self.servicer.in_flight and not stopped.is_set() and time.monotonic() < deadline:
                time.sleep(DRAIN_POLL_S)
            # Health Watch streams never end by themselves: once no Check runs, end them
            # instead of waiting out the whole grace period.
            server.stop(0)
            stopped.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
        if self._admin is not None:
            self._admin.stop(0).wait()
            self._admin = None
        if self._metrics is not None:
            self._metrics.stop()
            self._metrics = None
        flush_decision_log()
        logger.info("stopped")

    def wait(self) -> None:
        if self._server is not None:
            self._server.wait_for_termination()
