"""Command line: `extauthz serve`, `extauthz validate`, `extauthz token`.

Only this module configures logging and exits the process. Every `serve` flag can also
be set with an `EXTAUTHZ_<FLAG>` environment variable (dashes as underscores); a flag on
the command line wins over the variable.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from extauthz import __version__, config
from extauthz.errors import ConfigError, PolicyError
from extauthz.logs import configure_logging

logger = logging.getLogger("extauthz")



def _env(flag: str) -> str | None:
    return os.environ.get("EXTAUTHZ_" + flag.upper().replace("-", "_"))


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"invalid label {text!r}: write KEY=VALUE, like app=httpbin")
    return key, value


def _address(text: str) -> str:
    """Check HOST:PORT (IPv6 hosts in brackets) and return it unchanged."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"invalid address {text!r}: write HOST:PORT, like 127.0.0.1:9001")
    return text


def _choice(*choices: str, fold: str = "") -> Any:
    """Build an argparse type that checks values from flags and from EXTAUTHZ_* variables alike.

    argparse checks `choices` only on the command line, not on a default read from the
    environment, so the check happens in the type function.
    """
    def parse(text: str) -> str:
        value = text
        if fold == "upper":
            value = text.upper()
        elif fold == "lower":
            value = text.lower()
        if value not in choices:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: choose one of {', '.join(choices)}")
        return value

    return parse


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give 0 or more")
    return value


# The largest number of milliseconds grpc takes (a 32-bit int), about 24.8 days. Every
# duration flag has this bound, so no value overflows a timer.
MAX_SECONDS = 2_147_483


def _float(text: str) -> float:
    """Parse a duration in seconds: a finite number up to MAX_SECONDS."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text} is out of range; give at most {MAX_SECONDS} seconds")
    return value


def _non_negative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; give 0 or more")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return value


def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    def flag(name: str, default: Any, help_text: str, **kwargs: Any) -> None:
        env_value = _env(name)
        parser.add_argument(f"--{name}", default=env_value if env_value is not None else default,
                            help=f"{help_text} (env EXTAUTHZ_{name.upper().replace('-', '_')}, default: %(default)s)",
                            **kwargs)

    flag("policies", str(config.DEFAULT_POLICIES), "directory of policy YAML files, read recursively")
    flag("listen", config.DEFAULT_LISTEN, "HOST:PORT of the gRPC listener; port 0 picks a free port",
         type=_address)
    flag("root-namespace", config.DEFAULT_ROOT_NAMESPACE, "namespace whose policies apply to every workload")
    flag("workload-namespace", None, "namespace of the workload when a Check does not name one")
    env_labels = _env("workload-label")
    parser.add_argument(
        "--workload-label", action="append", type=_label, metavar="KEY=VALUE",
        default=[_label(item) for item in env_labels.split(",") if item] if env_labels else None,
        help="label of the workload when a Check does not carry labels; repeatable "
             "(env EXTAUTHZ_WORKLOAD_LABEL, comma-separated)")
    flag("xff-num-trusted-hops", 0, "trusted proxies that append to X-Forwarded-For; remote.ip is the entry "
         "this many places from the right", type=_non_negative_int)
    flag("log-level", "INFO", "DEBUG adds the trace of every decision; INFO logs one line per decision; "
         "WARNING or ERROR log problems only", type=_choice("DEBUG", "INFO", "WARNING", "ERROR", fold="upper"))
    flag("admin-listen", None, "HOST:PORT of a separate plaintext gRPC listener for the Admin service "
         "(Explain, ListPolicies, Status); when not set, Admin is served on --listen", type=_address)
    flag("tls-cert", None, "PEM certificate chain: serve gRPC over TLS (needs --tls-key)")
    flag("tls-key", None, "PEM private key of --tls-cert")
    flag("tls-client-ca", None, "PEM CA bundle: require client certificates signed by it (mTLS)")
    flag("metrics-listen", None, "HOST:PORT of an HTTP listener for /metrics (Prometheus), /healthz and "
         "/readyz; off when not set", type=_address)
    flag("log-format", "text", "text or json (one object per line)", type=_choice("text", "json", fold="lower"))
    flag("workers", None, "server processes sharing the port (SO_REUSEPORT); default: one per available CPU, "
         "or 1 with port 0", type=_non_negative_int)
    parser.add_argument("--pin-workers", action="store_true",
                        default=(_env("pin-workers") or "").lower() in ("1", "true", "yes"),
                        help="pin worker i to the i-th CPU this process may use; measured faster when the "
                             "workers have those CPUs to themselves (env EXTAUTHZ_PIN_WORKERS)")
    flag("threads", config.DEFAULT_THREADS, "size of the thread pool that serves Checks in each process",
         type=_non_negative_int)
    flag("max-concurrent-streams", config.DEFAULT_MAX_CONCURRENT_STREAMS,
         "HTTP/2 streams per connection; a low limit makes Envoy open more connections, which "
         "SO_REUSEPORT spreads over the workers", type=_non_negative_int)
    flag("max-connection-age", config.DEFAULT_MAX_CONNECTION_AGE_S,
         "seconds after which a client connection gets HTTP/2 GOAWAY and the client reconnects, so "
         "SO_REUSEPORT hashes it to a worker again and load evens out; calls in flight, a health Watch "
         "too, get 5 more seconds; 0 turns it off",
         type=_non_negative_float)
    flag("grace-period", config.DEFAULT_GRACE_PERIOD_S, "seconds in-flight Checks get to finish on shutdown",
         type=_positive_float)
    flag("shutdown-delay", 0.0, "seconds to keep accepting Checks after health turns NOT_SERVING on "
         "shutdown, so load balancers and Kubernetes endpoints stop sending first", type=_non_negative_float)
    flag("startup-timeout", config.DEFAULT_STARTUP_TIMEOUT_S,
         "seconds to wait for the first fetch of every jwksUri before serving", type=_positive_float)
    flag("jwks-refresh-interval", config.DEFAULT_REFRESH_INTERVAL_S,
         "seconds between refetches of each jwksUri (with 10%% jitter)", type=_positive_float)
    flag("jwks-kid-cooldown", config.DEFAULT_KID_COOLDOWN_S,
         "minimum seconds between refetches caused by tokens with an unknown kid", type=_positive_float)
    flag("jwks-kid-refresh-wait", config.DEFAULT_KID_REFRESH_WAIT_S,
         "seconds a Check waits for a refetch its unknown kid caused", type=_non_negative_float)
    flag("jwks-fetch-timeout", config.DEFAULT_FETCH_TIMEOUT_S,
         "seconds a JWKS or OpenID fetch may take when the rule sets no timeout", type=_positive_float)
    flag("jwks-max-bytes", config.DEFAULT_MAX_JWKS_BYTES, "largest JWKS or OpenID document accepted",
         type=_non_negative_int)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="extauthz", description="Envoy external authorization for Istio "
                                     "RequestAuthentication and AuthorizationPolicy files.")
    parser.add_argument("--version", action="version", version=f"extauthz {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve envoy.service.auth.v3.Authorization/Check")
    _add_serve_flags(serve)

    validate = commands.add_parser("validate", help="check a policy directory the way serve loads it")
    validate.add_argument("directory", type=Path)
    validate.add_argument("--format", choices=("text", "json"), default="text")

    token = commands.add_parser("token", help="sign a JWT with a private key, for testing policies")
    token.add_argument("--key", type=Path, required=True, help="PEM private key (RSA, EC or Ed25519)")
    token.add_argument("--issuer", required=True)
    token.add_argument("--subject", default="alice", help="sub claim (default: %(default)s)")
    token.add_argument("--audience", action="append", default=[], help="repeatable")
    token.add_argument("--kid", default=None)
    token.add_argument("--alg", default=None, help="default: RS256, ES256/384/512 or EdDSA from the key type")
    token.add_argument("--ttl", type=int, default=3600, help="seconds until exp (default: %(default)s)")
    token.add_argument("--claim", action="append", default=[], metavar="NAME=JSON",
                       help='extra claim, value as JSON or plain text, like groups=["admin"]; repeatable')
    explain = commands.add_parser(
        "explain", help="decide one described request and print every step",
        description="Decide one request against a policy directory and print the decision with its trace: "
                    "which policies apply, how the token verified, which rule matched or why none did. "
                    "Describe the request as JSON (--request FILE, or - for stdin) and/or with flags; "
                    "flags win over JSON fields.")
    explain.add_argument("--policies", type=Path, default=config.DEFAULT_POLICIES)
    explain.add_argument("--root-namespace", default=config.DEFAULT_ROOT_NAMESPACE)
    explain.add_argument("--request", metavar="FILE", help="JSON object with fields method, path, host, scheme, "
                         "headers, token, namespace, labels, source_principal, source_ip, remote_ip, "
                         "destination_ip, destination_port, sni")
    explain.add_argument("--method")
    explain.add_argument("--path", help="with the query string")
    explain.add_argument("--host")
    explain.add_argument("--header", action="append", default=[], metavar="NAME:VALUE")
    explain.add_argument("--token", help='sent as "authorization: Bearer TOKEN"')
    explain.add_argument("--namespace", help="workload namespace")
    explain.add_argument("--label", action="append", type=_label, default=[], metavar="KEY=VALUE",
                         help="workload label; repeatable")
    explain.add_argument("--source-principal")
    explain.add_argument("--source-ip")
    explain.add_argument("--remote-ip")
    explain.add_argument("--format", choices=("text", "json"), default="text")
    explain.add_argument("--startup-timeout", type=_positive_float, default=config.DEFAULT_STARTUP_TIMEOUT_S,
                         help="seconds to wait for the first fetch of each jwksUri")

    from extauthz import envoy_config

    envoy_config.add_parser(commands)
    return parser


def serve(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.log_format)
    serve_config = config.ServeConfig(
        policies=Path(args.policies),
        listen=args.listen,
        root_namespace=args.root_namespace,
        workload_namespace=args.workload_namespace or None,
        workload_labels=dict(args.workload_label or []),
        xff_num_trusted_hops=int(args.xff_num_trusted_hops),
        log_level=args.log_level,
        log_format=args.log_format,
        threads=max(1, int(args.threads)),
        grace_period_s=float(args.grace_period),
        shutdown_delay_s=max(0.0, float(args.shutdown_delay)),
        startup_timeout_s=float(args.startup_timeout),
        jwks_refresh_interval_s=float(args.jwks_refresh_interval),
        jwks_kid_cooldown_s=float(args.jwks_kid_cooldown),
        jwks_kid_refresh_wait_s=float(args.jwks_kid_refresh_wait),
        jwks_max_bytes=int(args.jwks_max_bytes),
        jwks_fetch_timeout_s=float(args.jwks_fetch_timeout),
        max_concurrent_streams=max(1, int(args.max_concurrent_streams)),
        max_connection_age_s=float(args.max_connection_age),
        pin_workers=bool(args.pin_workers),
        metrics_listen=args.metrics_listen or None,
        admin_listen=args.admin_listen or None,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        tls_client_ca=Path(args.tls_client_ca) if args.tls_client_ca else None,
    )
    # Set before grpcio is imported in this process or its workers. A value the user set,
    # even an empty one, is kept.
    os.environ.setdefault("GRPC_EXPERIMENTS", config.GRPC_EXPERIMENTS)
    workers = _worker_count(args.workers, serve_config.listen)
    if workers > 1:
        return _serve_workers(serve_config, workers)
    # Imported only now: with workers, prometheus-client must first see PROMETHEUS_MULTIPROC_DIR.
    from extauthz.server import ExtAuthzServer

    server = ExtAuthzServer(serve_config)
    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if stop_requested.is_set():
            logger.warning("second signal: exiting at once")
            os._exit(1)
        logger.info("received %s: draining for up to %.1fs", signal.Signals(signum).name,
                    serve_config.grace_period_s)
        stop_requested.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
    except ConfigError as exc:
        logger.error("%s", exc)
        return 2
    try:
        stop_requested.wait()
        server.stop(serve_config.grace_period_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _worker_count(requested: int | str | None, listen: str) -> int:
    if listen.rsplit(":", 1)[-1] == "0":
        if requested not in (None, 1, "1"):
            logger.warning("--listen with port 0 runs one worker: workers can only share a fixed port")
        return 1
    if requested is None:
        return available_cpus()
    return max(1, int(requested))


def available_cpus() -> int:
    """Count the CPUs this process may use: its CPU affinity, capped by a cgroup v2 CPU limit.

    In a container the affinity lists every CPU of the node, while the limit
    (`/sys/fs/cgroup/cpu.max`, "QUOTA PERIOD") sets how much of them the container gets.
    """
    count = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return count
    if quota == "max":
        return count
    return max(1, min(count, math.ceil(int(quota) / int(period))))


def _serve_workers(serve_config: config.ServeConfig, workers: int) -> int:
    from dataclasses import replace

    from extauthz.supervisor import Supervisor

    supervisor = Supervisor(replace(serve_config, reuse_port=True), workers)
    stop_count = 0

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop_count
        stop_count += 1
        if stop_count > 1:
            logger.warning("second signal: exiting at once")
            os._exit(1)
        logger.info("received %s: stopping %d workers", signal.Signals(signum).name, workers)
        supervisor.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    logger.info("starting %d worker processes on %s", workers, serve_config.listen)
    return supervisor.run()


def explain(args: argparse.Namespace) -> int:
    from extauthz.engine import Authorizer, PolicySnapshot
    from extauthz.explain import RequestDescription
    from extauthz.explain import explain as explain_request
    from extauthz.jwks import JwksCache
    from extauthz.policy import load_policy_dir
    from extauthz.request import InvalidPathError

    configure_logging("WARNING")
    try:
        description = _request_description(args, RequestDescription)
    except ValueError as exc:
        print(f"extauthz explain: invalid request description: {exc}", file=sys.stderr)
        return 2
    try:
        policy_set = load_policy_dir(args.policies)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        print(f"extauthz explain: {args.policies} is invalid; fix it first (see extauthz validate)", file=sys.stderr)
        return 1
    jwks = JwksCache()
    try:
        deadline = time.monotonic() + args.startup_timeout
        for source in jwks.update(policy_set.inline_jwks, policy_set.remote_jwks):
            source.wait_attempted(max(0.0, deadline - time.monotonic()))
        authorizer = Authorizer(jwks, PolicySnapshot(policy_set, args.root_namespace))
        try:
            decision, trace = explain_request(authorizer, description)
        except InvalidPathError as exc:
            print(f"extauthz explain: path {description.path!r} is rejected with 400: {exc}", file=sys.stderr)
            return 1
    finally:
        jwks.close()
    if args.format == "json":
        print(json.dumps({
            "allowed": decision.allowed, "reason": decision.reason, "http_status": decision.http_status,
            "body": decision.body, "policy": decision.policy, "rule": decision.rule,
            "principal": decision.principal, "revision": decision.revision, "trace": trace,
            "headers_to_set": dict(decision.headers_to_set), "headers_to_remove": list(decision.headers_to_remove),
            "query_parameters_to_remove": list(decision.query_parameters_to_remove),
            "dry_run": list(decision.shadow), "audited": decision.audited,
        }, indent=2))
    else:
        for line in trace:
            print(line)
    return 0


def _request_description(args: argparse.Namespace, description_type: Any) -> Any:
    data: dict[str, Any] = {}
    if args.request:
        text = sys.stdin.read() if args.request == "-" else Path(args.request).read_text()
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"--request is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("--request must hold a JSON object")
    for name in ("method", "path", "host", "token", "namespace", "source_principal", "source_ip", "remote_ip"):
        value = getattr(args, name)
        if value is not None:
            data[name] = value
    if args.header:
        headers = dict(data.get("headers") or {})
        for item in args.header:
            name, sep, value = item.partition(":")
            if not sep or not name.strip():
                raise ValueError(f"--header {item!r}: write NAME:VALUE")
            headers[name.strip()] = value.strip()
        data["headers"] = headers
    if args.label:
        data["labels"] = {**(data.get("labels") or {}), **dict(args.label)}
    description = description_type.from_mapping(data)
    if not description.namespace:
        raise ValueError("the workload namespace is missing: give --namespace or a namespace field")
    return description


def validate(args: argparse.Namespace) -> int:
    from extauthz.policy import load_policy_dir

    try:
        policy_set = load_policy_dir(args.directory)
    except PolicyError as exc:
        problems = exc.problems
        if args.format == "json":
            print(json.dumps({"valid": False, "problems": [
                {"file": p.file, "line": p.line, "severity": p.severity, "message": p.message} for p in problems
            ]}, indent=2))
        else:
            for problem in problems:
                print(problem)
            errors = sum(1 for p in problems if p.severity == "error")
            print(f"{args.directory}: invalid, {errors} error(s)", file=sys.stderr)
        return 1
    summary = (f"{args.directory}: valid, revision {policy_set.revision}: "
               f"{len(policy_set.request_authentications)} RequestAuthentication, "
               f"{len(policy_set.authorization_policies)} AuthorizationPolicy in {len(policy_set.files)} file(s)")
    if args.format == "json":
        print(json.dumps({"valid": True, "revision": policy_set.revision, "warnings": list(policy_set.warnings),
                          "request_authentications": len(policy_set.request_authentications),
                          "authorization_policies": len(policy_set.authorization_policies)}, indent=2))
    else:
        for warning in policy_set.warnings:
            print(warning)
        print(summary)
    return 0


def token(args: argparse.Namespace) -> int:
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(args.key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        print(f"extauthz token: cannot load private key {args.key}: {exc}", file=sys.stderr)
        return 2
    alg = args.alg
    if alg is None:
        if isinstance(key, ec.EllipticCurvePrivateKey):
            alg = {256: "ES256", 384: "ES384", 521: "ES512"}[key.curve.key_size]
        elif isinstance(key, ed25519.Ed25519PrivateKey):
            alg = "EdDSA"
        else:
            alg = "RS256"
    now = int(time.time())
    claims: dict[str, Any] = {"iss": args.issuer, "sub": args.subject, "iat": now, "exp": now + args.ttl}
    if args.audience:
        claims["aud"] = args.audience[0] if len(args.audience) == 1 else args.audience
    for item in args.claim:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            print(f"extauthz token: invalid --claim {item!r}: write NAME=VALUE", file=sys.stderr)
            return 2
        try:
            claims[name] = json.loads(raw)
        except ValueError:
            if raw.lstrip().startswith(("[", "{", '"')):
                print(f"extauthz token: --claim {name}: {raw!r} is not valid JSON; quote it for the shell, "
                      """like --claim 'groups=["admin"]'""", file=sys.stderr)
                return 2
            claims[name] = raw
    headers = {"kid": args.kid} if args.kid else None
    print(jwt.encode(claims, key, algorithm=alg, headers=headers))  # type: ignore[arg-type]
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from extauthz import envoy_config

    handlers = {"serve": serve, "validate": validate, "token": token, "explain": explain,
                "envoy-config": envoy_config.run}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
