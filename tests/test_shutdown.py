"""Graceful shutdown of a real server process: SIGTERM while a slow Check is in flight."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.check_requests import build_check_request, send_check
from tests.support.http_servers import LocalHttpServer
from tests.support.keys import jwks_document, make_rsa_key, sign_token, standard_claims
from tests.support.processes import ExtauthzProcess

ISSUER = "https://slow-idp.test"
SLOW_CHECK_S = 3.0  # how long a Check waits for the refetch that its unknown kid started


def test_sigterm_drains_inflight_check(tmp_path: Path) -> None:
    key = make_rsa_key("k1")
    with LocalHttpServer() as idp:
        idp.set_route("/keys", body=jwks_document(key))
        policies = tmp_path / "policies"
        policies.mkdir()
        (policies / "ra.yaml").write_text(json.dumps({
            "apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
            "metadata": {"name": "jwt", "namespace": "demo"},
            "spec": {"jwtRules": [{"issuer": ISSUER, "jwksUri": idp.url("/keys")}]}}))
        server = ExtauthzProcess(policies, "--workload-namespace", "demo", "--grace-period", "10",
                                 "--jwks-kid-refresh-wait", str(SLOW_CHECK_S), work_dir=tmp_path / "run")
        with server:
            server.wait_serving()
            # From now on the identity provider hangs, so the next refetch makes a Check wait.
            idp.set_route("/keys", body=jwks_document(key), delay_s=60)
            channel = grpc.insecure_channel(server.address)
            statuses: list[str] = []
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)

            def follow_health() -> None:
                try:
                    for update in watch:
                        statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(update.status))
                except grpc.RpcError:
                    pass  # the stream ends when the server stops

            watcher = threading.Thread(target=follow_health)
            watcher.start()

            token = sign_token(key, standard_claims(ISSUER), kid="rotated-away")
            responses = []
            slow = threading.Thread(target=lambda: responses.append(send_check(
                server.address, build_check_request(headers={"authorization": f"Bearer {token}"}), timeout=30)))
            started = time.monotonic()
            slow.start()
            time.sleep(0.5)  # the Check is now waiting for the refetch
            assert slow.is_alive()
            server.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]

            exit_code = server.process.wait(timeout=20)  # type: ignore[union-attr]
            stopped_after = time.monotonic() - started
            slow.join(timeout=5)
            watcher.join(timeout=5)
            channel.close()

    assert exit_code == 0, server.log_text()
    assert len(responses) == 1  # the in-flight Check got its response
    assert responses[0].denied_response.body == "Jwks doesn't have key to match kid or alg from Jwt"
    assert statuses[0] == "SERVING"
    assert "NOT_SERVING" in statuses  # health flipped before the process exited
    assert stopped_after < 10 + SLOW_CHECK_S  # within the grace period
    log = server.log_text()
    assert log.index("received SIGTERM") < log.index("stopped")
