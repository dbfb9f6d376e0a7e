"""Section 2: wrk through one Envoy with four listeners (no auth, Envoy's own filters with and without
a verified-token cache, ext_authz).

All listeners respond with `direct_response`, so no upstream server adds its cost.
They reuse the HTTP connection manager, the ext_authz filter, its per-route settings and
the `extauthz` cluster of deploy/envoy/envoy.yaml, the configuration users copy. The
`native` listener enforces the same policies with `envoy.filters.http.jwt_authn` and
`envoy.filters.http.rbac`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import yaml

from benchmarks.context import BenchContext, Section
from benchmarks.loadgen import BenchmarkError, WrkResult, run_wrk, wrk_command
from benchmarks.measure import Summary, paired_differences, paired_ratios
from benchmarks.report import log_problems, table
from benchmarks.scenario import (
    AUDIENCE,
    GROUP,
    ISSUER,
    LABELS,
    METHOD,
    NAMESPACE,
    PATH,
    PinnedEnvoy,
    PinnedExtauthz,
    http_status,
)
from tests.support.envoy_bootstrap import (
    EXT_AUTHZ_FILTER,
    _find_named,
    _http_connection_manager,
    _set_single_endpoint_port,
    load_deploy_bootstrap,
)
from tests.support.keys import sign_token, standard_claims

HTTP_CONNECTION_MANAGER = "envoy.filters.network.http_connection_manager"
ROUTER_FILTER = "envoy.filters.http.router"
JWT_AUTHN_FILTER = "envoy.filters.http.jwt_authn"
VARIANTS = ("passthrough", "native", "native_no_cache", "ext_authz")
THROUGHPUT_CONNECTIONS = 8
JWT_PROVIDER = "bench"
# Warnings that every Envoy of this benchmark logs, unrelated to the product.
ENVOY_EXPECTED_WARNINGS = (
    "no configured limit to the number of allowed active downstream connections",
    "caught ENVOY_SIGTERM",
)

TITLE = "2. Through Envoy"


def _direct_response_route() -> dict[str, Any]:
    return {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}


def _native_filters(jwks_url: str, token_cache: bool = True) -> list[dict[str, Any]]:
    """Return jwt_authn and RBAC filters equivalent to the scenario's two policies.

    A RequestAuthentication lets a request without a token pass, so jwt_authn has
    `allow_missing`, and RBAC then requires the principal. `requestPrincipals: ["ISSUER/*"]`
    becomes `iss` equal to the issuer plus a present `sub`. With `token_cache`, the
    verified-token cache is on (`jwt_cache_config`), because extauthz also caches verified
    tokens and the benchmark repeats one token. Without the field, Envoy verifies every token.
    """
    def claim(name: str, value: dict[str, Any]) -> dict[str, Any]:
        # sourced_metadata replaces Principal.metadata, which Envoy 1.40 logs as deprecated.
        # DYNAMIC is the request's dynamic metadata, where jwt_authn puts the payload.
        return {"sourced_metadata": {"metadata_source": "DYNAMIC", "metadata_matcher": {
            "filter": JWT_AUTHN_FILTER, "path": [{"key": "jwt_payload"}, {"key": name}], "value": value}}}

    jwt_authn = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": {JWT_PROVIDER: {
            "issuer": ISSUER,
            "audiences": [AUDIENCE],
            "remote_jwks": {
                "http_uri": {"uri": jwks_url, "cluster": "jwks", "timeout": "5s"},
                "cache_duration": "600s",
                "async_fetch": {},
            },
            "from_headers": [{"name": "authorization", "value_prefix": "Bearer "}],
            "forward": False,
            "payload_in_metadata": "jwt_payload",
            **({"jwt_cache_config": {"jwt_cache_size": 100}} if token_cache else {}),
        }},
        "rules": [{"match": {"prefix": "/"}, "requires": {"requires_any": {"requirements": [
            {"provider_name": JWT_PROVIDER}, {"allow_missing": {}}]}}}],
    }
    rbac = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
        "rules": {"action": "ALLOW", "policies": {f"{NAMESPACE}/api-readers": {
            "permissions": [{"and_rules": {"rules": [
                {"header": {"name": ":method", "string_match": {"exact": METHOD}}},
                {"url_path": {"path": {"prefix": "/api/"}}},
            ]}}],
            "principals": [{"and_ids": {"ids": [
                claim("iss", {"string_match": {"exact": ISSUER}}),
                claim("sub", {"present_match": True}),
                claim("groups", {"list_match": {"one_of": {"string_match": {"exact": GROUP}}}}),
            ]}}],
        }}},
    }
    return [{"name": JWT_AUTHN_FILTER, "typed_config": jwt_authn},
            {"name": "envoy.filters.http.rbac", "typed_config": rbac}]


def envoy_bootstrap(extauthz_port: int, jwks_port: int, jwks_url: str) -> str:
    """Return bootstrap YAML with a listener per variant (VARIANTS) on 127.0.0.1, port 0."""
    deploy = load_deploy_bootstrap()
    ingress = _find_named(deploy["static_resources"]["listeners"], "ingress", "listener")
    manager_template = _http_connection_manager(ingress)
    filters = manager_template["http_filters"]
    ext_authz_filter = _find_named(filters, EXT_AUTHZ_FILTER, "HTTP filter")
    router_filter = _find_named(filters, ROUTER_FILTER, "HTTP filter")
    deploy_route = manager_template["route_config"]["virtual_hosts"][0]["routes"][0]

    ext_authz_route = _direct_response_route()
    ext_authz_route["typed_per_filter_config"] = copy.deepcopy(deploy_route["typed_per_filter_config"])
    extensions = ext_authz_route["typed_per_filter_config"][EXT_AUTHZ_FILTER]["check_settings"][
        "context_extensions"]
    extensions.clear()
    extensions["namespace"] = NAMESPACE
    extensions.update({f"label.{key}": value for key, value in LABELS.items()})

    def listener(name: str, http_filters: list[dict[str, Any]], route: dict[str, Any]) -> dict[str, Any]:
        manager = copy.deepcopy(manager_template)
        manager["stat_prefix"] = name
        manager["http_filters"] = [*copy.deepcopy(http_filters), router_filter]
        manager["route_config"] = {"name": name, "virtual_hosts": [{"name": name, "domains": ["*"],
                                                                    "routes": [route]}]}
        return {"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [{"name": HTTP_CONNECTION_MANAGER, "typed_config": manager}]}]}

    extauthz_cluster = copy.deepcopy(_find_named(deploy["static_resources"]["clusters"], "extauthz", "cluster"))
    _set_single_endpoint_port(extauthz_cluster, extauthz_port)
    jwks_cluster = {
        "name": "jwks", "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "jwks", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": "127.0.0.1", "port_value": jwks_port}}}}]}]},
    }
    bootstrap = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                listener("passthrough", [], _direct_response_route()),
                listener("native", _native_filters(jwks_url), _direct_response_route()),
                listener("native_no_cache", _native_filters(jwks_url, token_cache=False), _direct_response_route()),
                listener("ext_authz", [ext_authz_filter], ext_authz_route),
            ],
            "clusters": [extauthz_cluster, jwks_cluster],
        },
    }
    return yaml.safe_dump(bootstrap, sort_keys=False)


@dataclass
class VariantResults:
    throughput: list[WrkResult] = field(default_factory=list)
    one_connection: list[WrkResult] = field(default_factory=list)


def _verify_variants(ctx: BenchContext, urls: dict[str, str]) -> list[str]:
    """Check that every variant allows the benchmark request and that the two policy variants agree.

    Returns the checks made, for the report. Raises BenchmarkError on any other status.
    """
    scenario = ctx.scenario
    expired = sign_token(scenario.signing_key, standard_claims(ISSUER, audiences=(AUDIENCE,), ttl_s=-600,
                                                               groups=[GROUP]))
    cases = [
        ("valid token", PATH, {"authorization": f"Bearer {scenario.token}"}, 200, 200),
        ("no token", PATH, {}, 200, 403),
        ("token without the group claim", PATH, {"authorization": f"Bearer {scenario.token_without_group}"},
         200, 403),
        ("valid token, path outside /api/", "/other", {"authorization": f"Bearer {scenario.token}"}, 200, 403),
        ("expired token", PATH, {"authorization": f"Bearer {expired}"}, 200, 401),
    ]
    checked = []
    for label, path, headers, passthrough_status, policy_status in cases:
        for variant in VARIANTS:
            expected = passthrough_status if variant == "passthrough" else policy_status
            status = http_status(urls[variant].replace(PATH, path), headers)
            if status != expected:
                raise BenchmarkError(f"Envoy variant {variant}: {label} got HTTP {status}, expected {expected}; "
                                     "the variants do not enforce the same policy, so the run is invalid")
        checked.append(f"{label}: passthrough {passthrough_status}, the others {policy_status}")
    return checked


def run(ctx: BenchContext) -> Section:
    profile = ctx.profile
    scenario = ctx.scenario
    extauthz = PinnedExtauthz(ctx.cpus.server, scenario.policies_dir, *ctx.single_process_flags(),
                              work_dir=ctx.work_dir / "envoy-extauthz")
    envoy: PinnedEnvoy | None = None
    results = {variant: VariantResults() for variant in VARIANTS}
    try:
        extauthz.start()
        extauthz.wait_serving(service="envoy.service.auth.v3.Authorization")
        ctx.commands.add(extauthz.args)
        bootstrap = envoy_bootstrap(extauthz.port, scenario.jwks_server.port, scenario.jwks_url)
        envoy = PinnedEnvoy(ctx.cpus.server, bootstrap, work_dir=ctx.work_dir / "envoy", listener_name="ext_authz")
        envoy.start()
        ctx.commands.add(envoy.args)
        ports = envoy.listener_ports()
        urls = {variant: f"http://127.0.0.1:{ports[variant]}{PATH}" for variant in VARIANTS}
        checks = _verify_variants(ctx, urls)
        pids = {variant: [envoy.pid] for variant in VARIANTS}
        pids["ext_authz"] = [envoy.pid, extauthz.pid]

        def measure(variant: str, connections: int, duration_s: int) -> WrkResult:
            args = wrk_command(url=urls[variant], token=scenario.token, connections=connections,
                               duration_s=duration_s, cpu_list=ctx.cpus.client)
            ctx.commands.add(args)
            return run_wrk(args, pids[variant], duration_s, f"Envoy variant {variant}")

        for _ in range(profile.rounds):
            for variant in VARIANTS:
                results[variant].throughput.append(measure(variant, THROUGHPUT_CONNECTIONS, profile.envoy_round_s))
        for _ in range(profile.rounds):
            for variant in VARIANTS:
                results[variant].one_connection.append(measure(variant, 1, profile.envoy_latency_round_s))
        bootstrap_path = envoy.work_dir / "envoy.yaml"
        bootstrap_text = bootstrap_path.read_text()
    finally:
        if envoy is not None:
            envoy.stop()
        extauthz.stop()
    findings = log_problems("extauthz (behind Envoy)", extauthz.log_path)
    if envoy is not None:
        findings += log_problems("Envoy", envoy.log_path, ENVOY_EXPECTED_WARNINGS)
    return Section(TITLE, _render(ctx, results, checks, envoy, extauthz, bootstrap_text), findings)


def _render(ctx: BenchContext, results: dict[str, VariantResults], checks: list[str], envoy: PinnedEnvoy,
            extauthz: PinnedExtauthz, bootstrap_text: str) -> str:
    profile = ctx.profile
    rows = []
    for variant in VARIANTS:
        throughput = results[variant].throughput
        single = results[variant].one_connection
        extauthz_cpu = (Summary.of([r.cpu_us_per_request([extauthz.pid]) for r in throughput]).format()
                        if variant == "ext_authz" else "–")
        busy = [100 * r.cpu.total_us / (profile.envoy_round_s * 1_000_000) for r in throughput]
        rows.append([
            f"`{variant}`",
            Summary.of([r.requests_per_s for r in throughput]).format(),
            Summary.of([r.p50_ms for r in throughput]).format(2),
            Summary.of([r.p99_ms for r in throughput]).format(2),
            Summary.of([r.cpu_us_per_request([envoy.pid]) for r in throughput]).format(),
            extauthz_cpu,
            Summary.of(busy).format(0, " %"),
            Summary.of([r.p50_ms for r in single]).format(3),
            Summary.of([r.p99_ms for r in single]).format(3),
        ])

    def rate(variant: str) -> list[float]:
        return [r.requests_per_s for r in results[variant].throughput]

    def server_cpu(variant: str) -> list[float]:
        return [r.cpu.total_us / r.requests for r in results[variant].throughput]

    def single_p50(variant: str) -> list[float]:
        return [r.p50_ms * 1000 for r in results[variant].one_connection]

    return "\n".join([
        f"One Envoy (`--concurrency 1`) on CPU {ctx.cpus.server} has four listeners that respond with "
        "`direct_response` 200:",
        "",
        "- `passthrough`: no auth filter.",
        "- `native`: the same policies in Envoy's own filters. `jwt_authn` fetches the keys from the same local "
        "JWKS server, with `forward: false` and a verified-token cache of 100 entries. `rbac` requires the "
        "issuer, a subject, the method, the path prefix `/api/` and the `groups` claim.",
        "- `native_no_cache`: `native` without `jwt_cache_config`, so Envoy verifies the signature of every "
        "token (Envoy enables the cache only when the field is set).",
        "- `ext_authz`: the ext_authz filter and per-route settings of `deploy/envoy/envoy.yaml`, calling one "
        f"`extauthz serve` process that also runs on CPU {ctx.cpus.server}.",
        "",
        f"So each variant has one CPU for all its server-side work, and wrk (`-t 1`) runs on CPU "
        f"{ctx.cpus.client}. Before the load, urllib checked every variant:",
        "",
        *[f"- {check}" for check in checks],
        "",
        f"Throughput: `wrk -c {THROUGHPUT_CONNECTIONS} -d {profile.envoy_round_s}s`. One connection: "
        f"`wrk -c 1 -d {profile.envoy_latency_round_s}s`. Every round fails the run on a non-2xx response "
        "or a socket error.",
        "",
        table(["variant", "req/s", "p50 ms", "p99 ms", "Envoy CPU µs/req", "extauthz CPU µs/req",
               f"CPU {ctx.cpus.server} busy", "p50 ms, 1 conn", "p99 ms, 1 conn"], rows),
        "",
        f"CPU {ctx.cpus.server} busy is the server processes' CPU time over the round's duration. Below about "
        "100 % the variant did not saturate its CPU, so its req/s is limited by wrk on the other CPU, and "
        "the CPU time per request is the better measure of its cost.",
        "",
        f"- req/s of `ext_authz` over `native`: **{paired_ratios(rate('ext_authz'), rate('native')).format(2)}**; "
        f"over `native_no_cache`: **{paired_ratios(rate('ext_authz'), rate('native_no_cache')).format(2)}**",
        f"- req/s of `ext_authz` over `passthrough`: "
        f"**{paired_ratios(rate('ext_authz'), rate('passthrough')).format(2)}**",
        f"- req/s of `native` over `passthrough`: {paired_ratios(rate('native'), rate('passthrough')).format(2)}",
        f"- Server CPU per request (Envoy and extauthz) of `ext_authz` over `native`: "
        f"**{paired_ratios(server_cpu('ext_authz'), server_cpu('native')).format(1)}×**; "
        f"`ext_authz` over `passthrough`: "
        f"{paired_ratios(server_cpu('ext_authz'), server_cpu('passthrough')).format(1)}×; "
        f"`native` over `passthrough`: {paired_ratios(server_cpu('native'), server_cpu('passthrough')).format(2)}×; "
        f"`ext_authz` over `native_no_cache`: "
        f"{paired_ratios(server_cpu('ext_authz'), server_cpu('native_no_cache')).format(1)}×",
        f"- p50 added at one connection by `ext_authz` over `passthrough`: "
        f"**{paired_differences(single_p50('ext_authz'), single_p50('passthrough')).format()} µs**; "
        f"by `native`: {paired_differences(single_p50('native'), single_p50('passthrough')).format()} µs",
        "",
        "<details><summary>Envoy bootstrap of this run</summary>",
        "",
        "```yaml",
        bootstrap_text.rstrip(),
        "```",
        "",
        "</details>",
    ])
