"""Section 5: a full policy reload (read, settle, validate, compile, swap) of large policy sets.

The policies are written one per file, as a ConfigMap with many keys would mount them,
and loaded by the reloader the server uses, without gRPC and without key fetches.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from benchmarks.context import BenchContext, Section
from benchmarks.measure import Summary
from benchmarks.report import table
from extauthz.engine import Authorizer
from extauthz.jwks import JwksCache
from extauthz.reload import SETTLE_S, PolicyReloader

TITLE = "5. Policy reload"
POLICY_COUNTS = (100, 1000)


def _write_policies(directory: Path, count: int) -> None:
    for index in range(count):
        document = {
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": f"policy-{index}", "namespace": f"ns-{index % 100}"},
            "spec": {
                "selector": {"matchLabels": {"app": f"app-{index % 10}"}},
                "rules": [{
                    "from": [{"source": {"requestPrincipals": ["https://issuer.bench.local/*"]}}],
                    "to": [{"operation": {"methods": ["GET", "POST"],
                                          "paths": [f"/api/{index}/*", "/users/{*}/profile"]}}],
                    "when": [{"key": "request.auth.claims[groups]", "values": ["readers", "staff"]},
                             {"key": "remote.ip", "values": ["10.0.0.0/8"]}],
                }],
            },
        }
        (directory / f"policy-{index:04d}.yaml").write_text(json.dumps(document, indent=2))


def _time_reload(directory: Path) -> float:
    jwks = JwksCache()
    reloader = PolicyReloader(directory, Authorizer(jwks), jwks, "istio-system", startup_timeout_s=1.0)
    started = time.perf_counter()
    if not reloader.reload():
        raise RuntimeError(f"the benchmark policies in {directory} did not load: {reloader.last_error}")
    elapsed = time.perf_counter() - started
    jwks.close()
    return elapsed


def run(ctx: BenchContext) -> Section:
    rows = []
    for count in POLICY_COUNTS:
        with tempfile.TemporaryDirectory(prefix="extauthz-reload-", dir=ctx.work_dir) as name:
            directory = Path(name)
            _write_policies(directory, count)
            times = [_time_reload(directory) for _ in range(ctx.profile.rounds)]
        seconds = Summary.of(times)
        rows.append([f"{count:,}", seconds.format(3, " s"), Summary.of([t - SETTLE_S for t in times]).format(3, " s")])
    markdown = "\n\n".join([
        f"The reloader of `extauthz serve` loads N AuthorizationPolicies, one per file, {ctx.profile.rounds} "
        "times each. The time covers reading every file twice (the second read, "
        f"{SETTLE_S * 1000:.0f} ms later, makes sure no file was being written), YAML parsing with line numbers, "
        "validation, compilation and the swap.",
        table(["policies", "reload", "reload without the settle wait"], rows),
    ])
    return Section(TITLE, markdown)
