"""`--max-connection-age`: Envoy reconnects when extauthz recycles a connection, and no Check fails.

Recycling lets SO_REUSEPORT hash a long-lived Envoy connection to a worker again, so
the load of few connections spreads over the workers in time.
"""

from __future__ import annotations

import http.client
import textwrap
import time
from pathlib import Path

from tests.support.envoy_bootstrap import bootstrap_for_test
from tests.support.http_servers import EchoUpstream
from tests.support.processes import EnvoyProcess, ExtauthzProcess

CONNECTION_AGE_S = 0.3
LOAD_S = 2.5

# Without a RequestAuthentication, requests to /public are allowed and others denied.
POLICY = textwrap.dedent("""\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata:
      name: public-only
      namespace: demo
    spec:
      selector:
        matchLabels:
          app: httpbin
      action: ALLOW
      rules:
      - to:
        - operation:
            paths: ["/public"]
    """)


def envoy_counter(envoy: EnvoyProcess, name: str) -> int:
    status, body = envoy.admin_get(f"/stats?filter=^{name}$")
    assert status == 200, body
    for line in body.splitlines():
        stat, _, value = line.partition(": ")
        if stat == name:
            return int(value)
    raise AssertionError(f"Envoy has no counter {name}: {body!r}")


def test_recycled_connections_lose_no_check(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "policy.yaml").write_text(POLICY, encoding="utf-8")
    statuses: dict[str, list[int]] = {"/public": [], "/private": []}

    with (ExtauthzProcess(policies, "--max-connection-age", str(CONNECTION_AGE_S),
                          work_dir=tmp_path / "extauthz") as extauthz,
          EchoUpstream() as upstream):
        extauthz.wait_serving(timeout=20)
        bootstrap = bootstrap_for_test(extauthz_port=extauthz.port, upstream_port=upstream.port,
                                       context_extensions={"namespace": "demo", "label.app": "httpbin"})
        with EnvoyProcess(bootstrap, work_dir=tmp_path / "envoy") as envoy:
            connection = http.client.HTTPConnection("127.0.0.1", envoy.http_port, timeout=10)
            deadline = time.monotonic() + LOAD_S
            while time.monotonic() < deadline:
                for path, seen in statuses.items():
                    connection.request("GET", path)
                    response = connection.getresponse()
                    response.read()
                    seen.append(response.status)
            connection.close()
            connections = envoy_counter(envoy, "cluster.extauthz.upstream_cx_total")
            errors = envoy_counter(envoy, "http.ingress.ext_authz.error")

    assert len(statuses["/public"]) > 50  # the load spanned several connection ages
    assert set(statuses["/public"]) == {200}
    assert set(statuses["/private"]) == {403}
    assert errors == 0
    # One connection per age at least, beside the health check connection.
    assert connections >= LOAD_S / CONNECTION_AGE_S / 2
