"""Checks of deploy/envoy/envoy.yaml, the Envoy bootstrap that users copy."""

from __future__ import annotations

import subprocess

from tests.support.envoy_bootstrap import (
    DEPLOY_BOOTSTRAP_PATH,
    ext_authz_filter_config,
    load_deploy_bootstrap,
    route_context_extensions,
)
from tests.support.processes import REPO_ROOT, find_tool


def test_envoy_validates_deploy_bootstrap() -> None:
    result = subprocess.run(
        [find_tool("envoy"), "--mode", "validate", "-c", str(DEPLOY_BOOTSTRAP_PATH)],
        cwd=REPO_ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "OK" in result.stdout, output


def test_deploy_bootstrap_fails_closed() -> None:
    config = ext_authz_filter_config(load_deploy_bootstrap())

    assert config["failure_mode_allow"] is False
    assert config["transport_api_version"] == "V3"
    assert config["grpc_service"]["envoy_grpc"]["cluster_name"] == "extauthz"


def test_deploy_bootstrap_names_demo_workload() -> None:
    extensions = route_context_extensions(load_deploy_bootstrap())

    assert extensions == [{"namespace": "demo", "label.app": "httpbin"}]
