"""Load deploy/envoy/envoy.yaml and point it at the servers of a test.

Tests run the bootstrap that users copy, not a copy of it, so a change to that file
is tested end to end. Only addresses and the workload of the ext_authz check change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.support.processes import REPO_ROOT

DEPLOY_BOOTSTRAP_PATH = REPO_ROOT / "deploy" / "envoy" / "envoy.yaml"

EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"


def load_deploy_bootstrap(path: Path = DEPLOY_BOOTSTRAP_PATH) -> dict[str, Any]:
    with open(path, encoding="utf-8") as bootstrap_file:
        return yaml.safe_load(bootstrap_file)


def _find_named(items: list[dict[str, Any]], name: str, kind: str) -> dict[str, Any]:
    for item in items:
        if item.get("name") == name:
            return item
    raise KeyError(f"{kind} {name!r} not found in {DEPLOY_BOOTSTRAP_PATH}")


def _set_single_endpoint_port(cluster: dict[str, Any], port: int) -> None:
    endpoints = cluster["load_assignment"]["endpoints"]
    lb_endpoints = [lb for group in endpoints for lb in group["lb_endpoints"]]
    if len(lb_endpoints) != 1:
        raise ValueError(f"cluster {cluster['name']!r} has {len(lb_endpoints)} endpoints, expected 1")
    socket_address = lb_endpoints[0]["endpoint"]["address"]["socket_address"]
    socket_address["address"] = "127.0.0.1"
    socket_address["port_value"] = port


def _http_connection_manager(listener: dict[str, Any]) -> dict[str, Any]:
    for chain in listener["filter_chains"]:
        for network_filter in chain["filters"]:
            if network_filter["name"] == "envoy.filters.network.http_connection_manager":
                return network_filter["typed_config"]
    raise KeyError(f"listener {listener['name']!r} has no http_connection_manager")


def route_context_extensions(bootstrap: dict[str, Any]) -> list[dict[str, str]]:
    """Return the ext_authz `context_extensions` mapping of every route, for editing in place."""
    manager = _http_connection_manager(_find_named(bootstrap["static_resources"]["listeners"], "ingress", "listener"))
    extensions = []
    for virtual_host in manager["route_config"]["virtual_hosts"]:
        for route in virtual_host["routes"]:
            per_filter = route.get("typed_per_filter_config", {}).get(EXT_AUTHZ_FILTER)
            if per_filter is not None:
                extensions.append(per_filter["check_settings"]["context_extensions"])
    return extensions


def ext_authz_filter_config(bootstrap: dict[str, Any]) -> dict[str, Any]:
    manager = _http_connection_manager(_find_named(bootstrap["static_resources"]["listeners"], "ingress", "listener"))
    return _find_named(manager["http_filters"], EXT_AUTHZ_FILTER, "HTTP filter")["typed_config"]


def bootstrap_for_test(
    extauthz_port: int,
    upstream_port: int,
    context_extensions: dict[str, str] | None = None,
) -> str:
    """Return the deploy bootstrap as YAML text, rewritten for a test.

    The admin interface and the `ingress` listener bind 127.0.0.1 port 0, so
    `EnvoyProcess` learns their ports from Envoy. The `extauthz` and `upstream`
    clusters point at the given ports on 127.0.0.1. `context_extensions`, when given,
    replaces the workload of every route's ext_authz check.
    """
    bootstrap = load_deploy_bootstrap()

    bootstrap["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=0)

    listener = _find_named(bootstrap["static_resources"]["listeners"], "ingress", "listener")
    # Tests must not accept connections from other hosts.
    listener["address"]["socket_address"].update(address="127.0.0.1", port_value=0)

    clusters = bootstrap["static_resources"]["clusters"]
    _set_single_endpoint_port(_find_named(clusters, "extauthz", "cluster"), extauthz_port)
    _set_single_endpoint_port(_find_named(clusters, "upstream", "cluster"), upstream_port)

    if context_extensions is not None:
        for extensions in route_context_extensions(bootstrap):
            extensions.clear()
            extensions.update(context_extensions)

    return yaml.safe_dump(bootstrap, sort_keys=False)
