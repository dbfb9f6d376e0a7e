"""`extauthz envoy-config`: print the Envoy configuration that sends one workload's requests to extauthz.

The configuration is built from the typed Envoy API messages of `envoy-data-plane`, an
optional dependency (`pip install 'extauthz[envoy]'`) that only this command imports. The
settings follow deploy/envoy/envoy.yaml, whose comments give the reason for each of them.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

from extauthz import config

if TYPE_CHECKING:
    from envoy_data_plane.envoy.config.cluster.v3 import Cluster
    from envoy_data_plane.envoy.config.core.v3 import Address
    from envoy_data_plane.envoy.config.listener.v3 import Listener
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import HttpFilter
    from envoy_data_plane.google.protobuf import Any as AnyMessage

MISSING_DEPENDENCY_MESSAGE = "envoy-config needs the optional dependency: pip install 'extauthz[envoy]'"

EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
ROUTER_FILTER = "envoy.filters.http.router"
HTTP_CONNECTION_MANAGER_FILTER = "envoy.filters.network.http_connection_manager"
EXT_AUTHZ_TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# Service name of the gRPC health check. extauthz reports it NOT_SERVING until its policies are loaded.
AUTHORIZATION_SERVICE = "envoy.service.auth.v3.Authorization"

LISTENER_NAME = "ingress"
EXTAUTHZ_CLUSTER = "extauthz"
UPSTREAM_CLUSTER = "upstream"

DEFAULT_EXTAUTHZ_ADDRESS = "127.0.0.1:9001"
DEFAULT_UPSTREAM = "127.0.0.1:8000"
# A proxy listener serves other hosts, so it binds every interface like deploy/envoy/envoy.yaml.
DEFAULT_LISTEN_ADDRESS = "0.0.0.0"  # noqa: S104
DEFAULT_LISTEN_PORT = 8080
DEFAULT_ADMIN_PORT = 9901
DEFAULT_TIMEOUT = "0.5s"
# Largest http2_protocol_options.max_concurrent_streams that Envoy 1.40 accepts.
MAX_HTTP2_CONCURRENT_STREAMS = 2_147_483_647

CONNECT_TIMEOUT = datetime.timedelta(seconds=1)
HEALTH_CHECK_TIMEOUT = datetime.timedelta(seconds=1)
HEALTH_CHECK_INTERVAL = datetime.timedelta(seconds=5)

DURATION_PATTERN = re.compile(r"(?P<number>\d+(?:\.\d+)?)(?P<unit>ms|s)")

PIECES_YAML_HEADER = f"""\
# Paste each piece into your Envoy configuration:
#   http_filters: into the HttpConnectionManager, before {ROUTER_FILTER}.
#   typed_per_filter_config: into each route or virtual host of the workload.
#   clusters: into static_resources.clusters.
# Also set normalize_path: true and merge_slashes: true on the HttpConnectionManager, so that
# policies match the same path that the upstream receives.
"""


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def is_ip_address(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


@dataclass(frozen=True)
class EnvoyConfigOptions:
    """Workload, addresses and settings of the printed configuration."""

    namespace: str
    labels: tuple[tuple[str, str], ...]
    extauthz_address: HostPort
    timeout: datetime.timedelta
    max_concurrent_streams: int
    upstream: HostPort
    listen_address: str
    listen_port: int
    admin_port: int

    def context_extensions(self) -> dict[str, str]:
        """Return the ext_authz context extensions that name the workload to extauthz."""
        extensions = {"namespace": self.namespace}
        for key, value in self.labels:
            extensions[f"label.{key}"] = value
        return extensions


def _port(text: str, *, allow_zero: bool) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: expected a whole number") from None
    lowest = 0 if allow_zero else 1
    if not lowest <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {port}: expected {lowest} to 65535")
    return port


def _listen_port(text: str) -> int:
    return _port(text, allow_zero=True)


def _host_port(text: str) -> HostPort:
    host, sep, port_text = text.rpartition(":")
    # An IPv6 address is written in brackets, like [::1]:9001.
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"invalid address {text!r}: write HOST:PORT, like 127.0.0.1:9001")
    return HostPort(host, _port(port_text, allow_zero=False))


def _namespace(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("invalid namespace '': give the namespace of the workload")
    return text


def _ip_address(text: str) -> str:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid IP address {text!r}: write one like 0.0.0.0 or 127.0.0.1") from None
    return text


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"invalid label {text!r}: write KEY=VALUE, like app=httpbin")
    return key, value


def _duration(text: str) -> datetime.timedelta:
    match = DURATION_PATTERN.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: write seconds or milliseconds, like 0.5s or 500ms"
        )
    number = float(match["number"])
    duration = datetime.timedelta(milliseconds=number) if match["unit"] == "ms" else datetime.timedelta(seconds=number)
    if duration <= datetime.timedelta(0):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be greater than 0")
    return duration


def _stream_limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid stream limit {text!r}: expected a whole number") from None
    if not 1 <= value <= MAX_HTTP2_CONCURRENT_STREAMS:
        raise argparse.ArgumentTypeError(f"invalid stream limit {value}: expected 1 to {MAX_HTTP2_CONCURRENT_STREAMS}")
    return value


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the `envoy-config` command and its flags."""
    parser = commands.add_parser(
        "envoy-config",
        help="print the Envoy configuration that sends a workload's requests to extauthz",
        description="Print the Envoy ext_authz filter, the per-route workload and the extauthz cluster "
                    "(or, with --bootstrap, a whole Envoy bootstrap) for one workload. "
                    "Needs the optional dependency: pip install 'extauthz[envoy]'.",
    )
    parser.add_argument("--namespace", required=True, type=_namespace, metavar="NS",
                        help="namespace of the workload, as in its policies")
    parser.add_argument("--label", action="append", type=_label, default=[], metavar="KEY=VALUE",
                        help="label of the workload that policy selectors match; repeatable")
    parser.add_argument("--extauthz-address", type=_host_port, default=_host_port(DEFAULT_EXTAUTHZ_ADDRESS),
                        metavar="HOST:PORT", help=f"address of extauthz serve (default: {DEFAULT_EXTAUTHZ_ADDRESS})")
    parser.add_argument("--timeout", type=_duration, metavar="DURATION", default=_duration(DEFAULT_TIMEOUT),
                        help=f"time Envoy waits for each Check, like 0.5s or 500ms (default: {DEFAULT_TIMEOUT})")
    parser.add_argument("--max-concurrent-streams", type=_stream_limit, metavar="N",
                        default=config.DEFAULT_MAX_CONCURRENT_STREAMS,
                        help="HTTP/2 streams per connection to extauthz; Envoy opens another connection when "
                             "they are all in use, and SO_REUSEPORT spreads connections over the server's "
                             "workers (default: %(default)s, the serve default)")
    parser.add_argument("--upstream", type=_host_port, default=_host_port(DEFAULT_UPSTREAM), metavar="HOST:PORT",
                        help=f"address of the workload, with --bootstrap (default: {DEFAULT_UPSTREAM})")
    parser.add_argument("--listen-address", type=_ip_address, default=DEFAULT_LISTEN_ADDRESS, metavar="IP",
                        help="IP address of the Envoy listener, with --bootstrap (default: %(default)s)")
    parser.add_argument("--listen-port", type=_listen_port, default=DEFAULT_LISTEN_PORT, metavar="PORT",
                        help="port of the Envoy listener, with --bootstrap; 0 picks a free port "
                             "(default: %(default)s)")
    parser.add_argument("--admin-port", type=_listen_port, default=DEFAULT_ADMIN_PORT, metavar="PORT",
                        help="port of the Envoy admin interface on 127.0.0.1, with --bootstrap; 0 picks a "
                             "free port (default: %(default)s)")
    parser.add_argument("--format", choices=("yaml", "json"), default="yaml", help="output format (default: yaml)")
    parser.add_argument("--bootstrap", action="store_true",
                        help="print a whole Envoy bootstrap: listener, routes, filters and both clusters")


def options_from_args(args: argparse.Namespace) -> EnvoyConfigOptions:
    """Build the options from parsed flags. Raises ValueError when a label key is given twice."""
    labels: dict[str, str] = {}
    for key, value in args.label:
        if key in labels and labels[key] != value:
            raise ValueError(f"--label {key} is given twice, as {labels[key]!r} and {value!r}: keep one")
        labels[key] = value
    return EnvoyConfigOptions(
        namespace=args.namespace,
        labels=tuple(labels.items()),
        extauthz_address=args.extauthz_address,
        timeout=args.timeout,
        max_concurrent_streams=args.max_concurrent_streams,
        upstream=args.upstream,
        listen_address=args.listen_address,
        listen_port=args.listen_port,
        admin_port=args.admin_port,
    )


def run(args: argparse.Namespace) -> int:
    """Print the configuration as YAML or JSON and return the exit code."""
    try:
        import envoy_data_plane  # noqa: F401
    except ImportError:
        print(MISSING_DEPENDENCY_MESSAGE, file=sys.stderr)
        return 2

    try:
        options = options_from_args(args)
    except ValueError as exc:
        print(f"extauthz envoy-config: {exc}", file=sys.stderr)
        return 2

    if args.bootstrap:
        document = bootstrap_document(options)
        header = ""
    else:
        document = pieces_document(options)
        header = PIECES_YAML_HEADER

    if args.format == "json":
        print(json.dumps(document, indent=2))
    else:
        print(header + yaml.safe_dump(document, sort_keys=False), end="")
    return 0


def pieces_document(options: EnvoyConfigOptions) -> dict[str, Any]:
    """Return the ext_authz filter, the per-route workload and the extauthz cluster as plain data."""
    return {
        "http_filters": [_to_data(ext_authz_http_filter(options))],
        "typed_per_filter_config": {EXT_AUTHZ_FILTER: _to_data(ext_authz_per_route(options))},
        "clusters": [_to_data(extauthz_cluster(options))],
    }


def bootstrap_document(options: EnvoyConfigOptions) -> dict[str, Any]:
    """Return a whole Envoy bootstrap as plain data."""
    from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources

    bootstrap = Bootstrap(
        # The admin interface can stop Envoy and change its configuration, so it listens on loopback only.
        admin=Admin(address=_socket_address("127.0.0.1", options.admin_port)),
        static_resources=BootstrapStaticResources(
            listeners=[ingress_listener(options)],
            clusters=[extauthz_cluster(options), upstream_cluster(options)],
        ),
    )
    return _to_data(bootstrap)


def ext_authz_http_filter(options: EnvoyConfigOptions) -> HttpFilter:
    """Build the ext_authz HTTP filter with gRPC transport V3 that fails closed with 503 when a Check fails."""
    from envoy_data_plane.envoy.config.core.v3 import ApiVersion, GrpcService, GrpcServiceEnvoyGrpc
    from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import ExtAuthz
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import HttpFilter
    from envoy_data_plane.envoy.type.v3 import HttpStatus, StatusCode

    ext_authz = ExtAuthz(
        transport_api_version=ApiVersion.V3,
        grpc_service=GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=EXTAUTHZ_CLUSTER),
            timeout=options.timeout,
        ),
        failure_mode_allow=False,
        status_on_error=HttpStatus(code=StatusCode.ServiceUnavailable),
        clear_route_cache=True,
        validate_mutations=True,
    )
    return HttpFilter(name=EXT_AUTHZ_FILTER, typed_config=_pack(ext_authz))


def ext_authz_per_route(options: EnvoyConfigOptions) -> AnyMessage:
    """Build the per-route ext_authz settings whose context extensions select the workload's policies."""
    from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import CheckSettings, ExtAuthzPerRoute

    per_route = ExtAuthzPerRoute(check_settings=CheckSettings(context_extensions=options.context_extensions()))
    return _pack(per_route)


def extauthz_cluster(options: EnvoyConfigOptions) -> Cluster:
    """Build the HTTP/2 cluster of extauthz, health-checked over gRPC."""
    from envoy_data_plane.envoy.config.core.v3 import HealthCheck, HealthCheckGrpcHealthCheck, Http2ProtocolOptions
    from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
        HttpProtocolOptions,
        HttpProtocolOptionsExplicitHttpConfig,
    )

    cluster = _cluster(EXTAUTHZ_CLUSTER, options.extauthz_address)
    # gRPC needs HTTP/2 to the upstream.
    protocol_options = HttpProtocolOptions(
        explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
            http2_protocol_options=Http2ProtocolOptions(max_concurrent_streams=options.max_concurrent_streams),
        ),
    )
    cluster.typed_extension_protocol_options = {HTTP_PROTOCOL_OPTIONS: _pack(protocol_options)}
    cluster.health_checks = [
        HealthCheck(
            timeout=HEALTH_CHECK_TIMEOUT,
            interval=HEALTH_CHECK_INTERVAL,
            unhealthy_threshold=2,
            healthy_threshold=1,
            grpc_health_check=HealthCheckGrpcHealthCheck(service_name=AUTHORIZATION_SERVICE),
        ),
    ]
    return cluster


def upstream_cluster(options: EnvoyConfigOptions) -> Cluster:
    return _cluster(UPSTREAM_CLUSTER, options.upstream)


def ingress_listener(options: EnvoyConfigOptions) -> Listener:
    """Build the listener whose only route sends every request, after the Check, to the upstream cluster."""
    from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
    from envoy_data_plane.envoy.config.route.v3 import Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost
    from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
        HttpConnectionManager,
        HttpFilter,
    )

    route = Route(
        match=RouteMatch(prefix="/"),
        route=RouteAction(cluster=UPSTREAM_CLUSTER),
        typed_per_filter_config={EXT_AUTHZ_FILTER: ext_authz_per_route(options)},
    )
    manager = HttpConnectionManager(
        stat_prefix=LISTENER_NAME,
        # This Envoy is the edge, so it appends the client address to x-forwarded-for instead
        # of trusting the header. Then remoteIpBlocks rules see the real client.
        use_remote_address=True,
        # Policies match the path that ext_authz receives, so Envoy normalizes it first.
        # Then "/public/../admin" and "//admin" cannot slip past a rule on "/admin".
        normalize_path=True,
        merge_slashes=True,
        route_config=RouteConfiguration(
            name=LISTENER_NAME,
            virtual_hosts=[VirtualHost(name="workload", domains=["*"], routes=[route])],
        ),
        http_filters=[
            ext_authz_http_filter(options),
            HttpFilter(name=ROUTER_FILTER, typed_config=_pack(Router())),
        ],
    )
    return Listener(
        name=LISTENER_NAME,
        address=_socket_address(options.listen_address, options.listen_port),
        filter_chains=[FilterChain(filters=[Filter(name=HTTP_CONNECTION_MANAGER_FILTER, typed_config=_pack(manager))])],
    )


def _cluster(name: str, address: HostPort) -> Cluster:
    """Build a cluster with one endpoint: STATIC for an IP address, STRICT_DNS for a host name."""
    from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType
    from envoy_data_plane.envoy.config.endpoint.v3 import (
        ClusterLoadAssignment,
        Endpoint,
        LbEndpoint,
        LocalityLbEndpoints,
    )

    discovery_type = ClusterDiscoveryType.STATIC if address.is_ip_address() else ClusterDiscoveryType.STRICT_DNS
    return Cluster(
        name=name,
        type=discovery_type,
        connect_timeout=CONNECT_TIMEOUT,
        load_assignment=ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                LocalityLbEndpoints(
                    lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=_socket_address(address.host, address.port)))],
                ),
            ],
        ),
    )


def _socket_address(host: str, port: int) -> Address:
    from envoy_data_plane.envoy.config.core.v3 import Address, SocketAddress

    return Address(socket_address=SocketAddress(address=host, port_value=port))


def _pack(message: Any) -> AnyMessage:
    from envoy_data_plane.google.protobuf import Any as AnyMessage

    return AnyMessage.pack(message)


def _to_data(message: Any) -> dict[str, Any]:
    """Convert a message to proto JSON data with snake_case field names, as Envoy's own docs write them."""
    import betterproto2

    data: dict[str, Any] = message.to_dict(casing=betterproto2.Casing.SNAKE)
    _add_failure_mode_allow(data)
    return data


def _add_failure_mode_allow(data: Any) -> None:
    """Write `failure_mode_allow: false` into every ext_authz filter config found in `data`.

    Proto JSON leaves out fields at their default value, and false is the default. The
    printed line shows readers that the filter fails closed by choice.
    """
    if isinstance(data, dict):
        if data.get("@type") == EXT_AUTHZ_TYPE_URL:
            data["failure_mode_allow"] = False
        for value in data.values():
            _add_failure_mode_allow(value)
    elif isinstance(data, list):
        for item in data:
            _add_failure_mode_allow(item)
