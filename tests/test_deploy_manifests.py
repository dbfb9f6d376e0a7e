"""Checks of the Kubernetes and Istio manifests in deploy/ and of deploy/Dockerfile.

The manifests are parsed with PyYAML and checked against each other and against the
product itself. The container's arguments and environment go through the real
`extauthz serve` argument parser. Every policy in the ConfigMap goes through the
validation that `extauthz validate` runs. No cluster and no Docker engine are needed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from extauthz.cli import build_parser
from extauthz.errors import PolicyError
from extauthz.policy import compile_policy_files
from tests.support.processes import REPO_ROOT

KUBERNETES_DIR = REPO_ROOT / "deploy" / "kubernetes"
ISTIO_DIR = REPO_ROOT / "deploy" / "istio"
DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"

NAMESPACE = "extauthz-system"
DEPLOYMENT = "extauthz"
AUTHORIZATION_SERVICE = "envoy.service.auth.v3.Authorization"
DEFAULT_GRACE_PERIOD_S = 10.0


def _manifest_files() -> list[Path]:
    return sorted(KUBERNETES_DIR.glob("*.yaml")) + sorted(ISTIO_DIR.glob("*.yaml"))


def _load(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


def _objects(kind: str) -> list[dict[str, Any]]:
    return [doc for path in _manifest_files() for doc in _load(path) if doc.get("kind") == kind]


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [doc for doc in _objects(kind) if name is None or doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/, found {len(found)}"
    return found[0]


def _pod_spec() -> dict[str, Any]:
    return _one("Deployment", DEPLOYMENT)["spec"]["template"]["spec"]


def _container() -> dict[str, Any]:
    containers = [c for c in _pod_spec()["containers"] if c["name"] == "extauthz"]
    assert len(containers) == 1, "the Deployment needs one container named extauthz"
    return containers[0]


def _container_env() -> dict[str, str]:
    return {item["name"]: item["value"] for item in _container().get("env", [])}


def _grpc_port() -> int:
    ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    return ports["grpc"]


def _pod_labels() -> dict[str, str]:
    return _one("Deployment", DEPLOYMENT)["spec"]["template"]["metadata"]["labels"]


def _is_subset(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def _effective_security(field: str) -> Any:
    """Return a securityContext field as the kubelet applies it, from the container before the pod."""
    container_context = _container().get("securityContext", {})
    if field in container_context:
        return container_context[field]
    return _pod_spec().get("securityContext", {}).get(field)


@pytest.fixture
def serve_args(monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """Parse the container's args with its env, the way `extauthz serve` starts in the pod."""
    for name in [name for name in os.environ if name.startswith("EXTAUTHZ_")]:
        monkeypatch.delenv(name)
    for name, value in _container_env().items():
        monkeypatch.setenv(name, value)
    # The parser reads EXTAUTHZ_* defaults when it is built, so build it after setting them.
    return build_parser().parse_args(_container()["args"])


def _configmap_policy_entries() -> list[tuple[str, str]]:
    configmap = _one("ConfigMap", "extauthz-policies")
    return sorted(configmap["data"].items())


def _policy_documents() -> list[dict[str, Any]]:
    return [doc for _, text in _configmap_policy_entries() for doc in yaml.safe_load_all(text) if doc]


def _extension_provider() -> dict[str, Any]:
    operator = _one("IstioOperator")
    providers = operator["spec"]["meshConfig"]["extensionProviders"]
    grpc_providers = [p for p in providers if "envoyExtAuthzGrpc" in p]
    assert len(grpc_providers) == 1, "expected one envoyExtAuthzGrpc extension provider"
    return grpc_providers[0]


def _custom_policy() -> dict[str, Any]:
    policies = [p for p in _objects("AuthorizationPolicy") if p["spec"].get("action") == "CUSTOM"]
    assert len(policies) == 1, "expected one CUSTOM AuthorizationPolicy in deploy/istio/"
    return policies[0]


# Every manifest file


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_manifest_has_kind_and_name(path: Path) -> None:
    documents = _load(path)

    assert documents, f"{path} has no YAML document"
    for doc in documents:
        assert doc.get("apiVersion"), f"{path}: a document has no apiVersion"
        assert doc.get("kind"), f"{path}: a document has no kind"
        if doc["kind"] != "Kustomization":
            assert doc.get("metadata", {}).get("name"), f"{path}: {doc['kind']} has no metadata.name"


def test_namespaced_objects_use_extauthz_namespace() -> None:
    for path in sorted(KUBERNETES_DIR.glob("*.yaml")):
        for doc in _load(path):
            if doc["kind"] in ("Kustomization", "Namespace"):
                continue
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{path}: {doc['kind']}"


def test_namespace_manifest_creates_namespace() -> None:
    assert _one("Namespace")["metadata"]["name"] == NAMESPACE


def test_kustomization_lists_every_manifest() -> None:
    kustomization = _load(KUBERNETES_DIR / "kustomization.yaml")[0]
    on_disk = {p.name for p in KUBERNETES_DIR.iterdir() if p.suffix in (".yaml", ".yml")}

    assert set(kustomization["resources"]) == on_disk - {"kustomization.yaml"}
    assert len(kustomization["resources"]) == len(set(kustomization["resources"]))


def test_kubectl_kustomize_builds_folder() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run([kubectl, "kustomize", str(KUBERNETES_DIR)], check=False, capture_output=True,
                            text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc)
    assert kinds == sorted(["Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget",
                            "HorizontalPodAutoscaler"])


# Deployment


def test_deployment_runs_serve_on_grpc_port() -> None:
    deployment = _one("Deployment", DEPLOYMENT)
    container = _container()

    assert deployment["spec"]["replicas"] == 2
    assert container["image"] == "extauthz:0.1.0"
    assert "command" not in container, "command would replace the image's ENTRYPOINT"
    assert container["args"] == ["serve", "--policies", "/etc/extauthz/policies", "--listen", "0.0.0.0:9001"]
    assert _grpc_port() == 9001


def test_deployment_selector_matches_pod_labels() -> None:
    selector = _one("Deployment", DEPLOYMENT)["spec"]["selector"]["matchLabels"]

    assert selector
    assert _is_subset(selector, _pod_labels())


def test_serve_parser_accepts_container_args(serve_args: argparse.Namespace) -> None:
    assert serve_args.command == "serve"
    assert int(serve_args.listen.rsplit(":", 1)[1]) == _grpc_port()
    assert serve_args.log_level == _container_env()["EXTAUTHZ_LOG_LEVEL"]
    # Left unset, --workers starts one process per CPU of the node, whatever the CPU limit.
    assert serve_args.workers == 1


def test_admin_service_only_on_loopback(serve_args: argparse.Namespace) -> None:
    # Without --admin-listen, the Admin service (ListPolicies, Explain) shares the Check port.
    host, _, port = serve_args.admin_listen.rpartition(":")

    assert host == "127.0.0.1"
    assert int(port) != _grpc_port()


def test_probes_use_grpc_on_container_port() -> None:
    container = _container()
    liveness = container["livenessProbe"]
    readiness = container["readinessProbe"]

    assert liveness["grpc"]["port"] == _grpc_port()
    assert liveness["grpc"]["service"] == ""
    assert readiness["grpc"]["port"] == _grpc_port()
    assert readiness["grpc"]["service"] == AUTHORIZATION_SERVICE


def test_startup_probe_allows_first_key_fetch(serve_args: argparse.Namespace) -> None:
    startup = _container()["startupProbe"]
    allowed_s = startup["periodSeconds"] * startup["failureThreshold"]

    assert startup["grpc"]["port"] == _grpc_port()
    assert startup["grpc"]["service"] == ""
    assert allowed_s > float(serve_args.startup_timeout)


def test_security_context_is_restricted() -> None:
    assert _effective_security("runAsNonRoot") is True
    assert _effective_security("runAsUser") == 10001
    assert _effective_security("readOnlyRootFilesystem") is True
    assert _effective_security("allowPrivilegeEscalation") is False
    assert _effective_security("capabilities") == {"drop": ["ALL"]}
    assert _effective_security("seccompProfile") == {"type": "RuntimeDefault"}


def test_pod_does_not_mount_api_token() -> None:
    assert _pod_spec()["automountServiceAccountToken"] is False


def test_service_links_disabled() -> None:
    # Service links would add EXTAUTHZ_PORT, EXTAUTHZ_SERVICE_HOST and others, in the
    # variable namespace that extauthz reads its flags from.
    assert _pod_spec()["enableServiceLinks"] is False


def test_policies_configmap_mounted_read_only(serve_args: argparse.Namespace) -> None:
    mounts = [m for m in _container()["volumeMounts"] if m["mountPath"] == serve_args.policies]
    assert len(mounts) == 1, f"no volume mounted at --policies {serve_args.policies}"
    mount = mounts[0]
    volumes = {v["name"]: v for v in _pod_spec()["volumes"]}

    assert mount["readOnly"] is True
    assert "subPath" not in mount, "a subPath mount never receives ConfigMap updates"
    assert volumes[mount["name"]]["configMap"]["name"] == "extauthz-policies"


def test_resources_have_requests_and_limits() -> None:
    resources = _container()["resources"]

    assert resources["requests"]["cpu"]
    assert resources["requests"]["memory"]
    assert resources["limits"]["cpu"]
    assert resources["limits"]["memory"]


def test_termination_grace_covers_drain(serve_args: argparse.Namespace) -> None:
    grace_period_s = float(serve_args.grace_period)
    pre_stop = _container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    pre_stop_s = float(pre_stop[1])
    termination_s = _pod_spec()["terminationGracePeriodSeconds"]

    assert termination_s > DEFAULT_GRACE_PERIOD_S
    assert termination_s > grace_period_s + pre_stop_s


def test_pods_spread_across_nodes() -> None:
    constraints = _pod_spec().get("topologySpreadConstraints", [])
    by_node = [c for c in constraints if c["topologyKey"] == "kubernetes.io/hostname"]
    anti_affinity = _pod_spec().get("affinity", {}).get("podAntiAffinity")

    assert by_node or anti_affinity, "replicas need topology spread or anti-affinity across nodes"
    for constraint in by_node:
        assert constraint["maxSkew"] == 1
        assert _is_subset(constraint["labelSelector"]["matchLabels"], _pod_labels())


def test_log_level_set_in_env() -> None:
    assert _container_env()["EXTAUTHZ_LOG_LEVEL"] in ("DEBUG", "INFO", "WARNING", "ERROR")


# Service, PodDisruptionBudget, HorizontalPodAutoscaler


def test_service_targets_container_port() -> None:
    service = _one("Service", "extauthz")
    ports = service["spec"]["ports"]
    assert len(ports) == 1
    port = ports[0]
    container_ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    target = port["targetPort"]
    target_port = container_ports[target] if isinstance(target, str) else target

    assert service["spec"]["type"] == "ClusterIP"
    assert port["name"] == "grpc"
    assert port["appProtocol"] == "grpc"
    assert port["port"] == _grpc_port()
    assert target_port == _grpc_port()
    assert _is_subset(service["spec"]["selector"], _pod_labels())


def test_pdb_selects_deployment_pods() -> None:
    budget = _one("PodDisruptionBudget", "extauthz")

    assert budget["metadata"]["namespace"] == NAMESPACE
    assert budget["spec"]["minAvailable"] == 1
    assert _is_subset(budget["spec"]["selector"]["matchLabels"], _pod_labels())


def test_hpa_scales_deployment_on_cpu() -> None:
    autoscaler = _one("HorizontalPodAutoscaler", "extauthz")
    spec = autoscaler["spec"]
    cpu = [m["resource"] for m in spec["metrics"] if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]

    assert autoscaler["apiVersion"] == "autoscaling/v2"
    assert autoscaler["metadata"]["namespace"] == NAMESPACE
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": DEPLOYMENT}
    assert spec["minReplicas"] == 2
    assert spec["maxReplicas"] == 10
    assert cpu == [{"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}]


# Policies in the ConfigMap


@pytest.mark.parametrize(("key", "text"), _configmap_policy_entries(),
                         ids=[key for key, _ in _configmap_policy_entries()])
def test_configmap_policy_passes_validation(key: str, text: str) -> None:
    assert key.endswith((".yaml", ".yml")), f"{key}: extauthz reads only *.yaml and *.yml files"
    # Raises PolicyError, which names the key, the line and the field, when the policy is invalid.
    compile_policy_files([(key, text.encode())])


def test_configmap_policies_validate_together() -> None:
    entries = _configmap_policy_entries()
    policy_set = compile_policy_files([(key, text.encode()) for key, text in entries])

    assert len(policy_set.request_authentications) >= 1
    assert len(policy_set.authorization_policies) >= 1
    assert policy_set.warnings == ()


def test_configmap_policies_apply_to_configured_workload(serve_args: argparse.Namespace) -> None:
    # Istio's CUSTOM action sends no workload labels, so extauthz uses --workload-label. A
    # policy whose selector does not match those labels would never apply.
    workload_labels = dict(serve_args.workload_label or [])

    for doc in _policy_documents():
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        assert doc["metadata"]["namespace"] in (serve_args.workload_namespace, serve_args.root_namespace), name
        selector = doc["spec"].get("selector", {}).get("matchLabels", {})
        assert _is_subset(selector, workload_labels), name


# Istio


def test_extension_provider_points_at_service() -> None:
    provider = _extension_provider()["envoyExtAuthzGrpc"]
    service = _one("Service", "extauthz")
    host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"

    assert provider["service"] == host
    assert provider["port"] == service["spec"]["ports"][0]["port"]


def test_extension_provider_fails_closed() -> None:
    provider = _extension_provider()["envoyExtAuthzGrpc"]

    assert provider["failOpen"] is False
    assert provider["timeout"] == "0.5s"
    assert provider["statusOnError"] == "503"
    assert "includeRequestBodyInCheck" not in provider


def test_custom_policy_names_extension_provider() -> None:
    policy = _custom_policy()

    assert policy["spec"]["provider"]["name"] == _extension_provider()["name"]


def test_custom_policy_valid_apart_from_action() -> None:
    # extauthz validates the Istio AuthorizationPolicy schema and rejects the CUSTOM action.
    # When the action is the only error, the selector, provider and rules are well formed.
    path = ISTIO_DIR / "authorizationpolicy-custom.yaml"
    with pytest.raises(PolicyError) as caught:
        compile_policy_files([(path.name, path.read_bytes())])
    errors = [problem for problem in caught.value.problems if problem.severity == "error"]

    assert len(errors) == 1, [str(problem) for problem in errors]
    assert "spec.action: CUSTOM" in errors[0].message


def test_custom_policy_selects_configured_workload(serve_args: argparse.Namespace) -> None:
    policy = _custom_policy()
    workload_labels = dict(serve_args.workload_label or [])

    assert policy["metadata"]["namespace"] == serve_args.workload_namespace
    assert policy["spec"]["selector"]["matchLabels"] == workload_labels


# Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """Parse deploy/Dockerfile into (INSTRUCTION, arguments), joining continued lines."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, arguments = full.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def _exec_form(keyword: str) -> list[str]:
    values = [arguments for kw, arguments in _final_stage() if kw == keyword]
    assert values, f"the final stage has no {keyword}"
    arguments = values[-1]
    assert arguments.startswith("["), f"{keyword} {arguments} is in shell form; write it as a JSON array"
    parsed = json.loads(arguments)
    assert isinstance(parsed, list)
    return parsed


def test_dockerfile_builds_from_python_slim() -> None:
    images = [arguments.split()[0] for keyword, arguments in _dockerfile_instructions() if keyword == "FROM"]

    assert len(images) >= 2, "expected a build stage and a runtime stage"
    assert set(images) == {"python:3.11-slim"}


def test_dockerfile_runs_as_non_root_user() -> None:
    users = [arguments for keyword, arguments in _final_stage() if keyword == "USER"]
    assert users, "the final stage sets no USER, so it runs as root"
    user, _, group = users[-1].partition(":")

    assert user.isdigit(), "runAsNonRoot can verify only a numeric USER"
    assert int(user) != 0
    assert int(user) == _effective_security("runAsUser")
    assert group != "0"


def test_dockerfile_entrypoint_is_extauthz() -> None:
    assert _exec_form("ENTRYPOINT") == ["extauthz"]


def test_dockerfile_cmd_serves_mounted_policies(serve_args: argparse.Namespace) -> None:
    cmd = _exec_form("CMD")

    assert cmd[0] == "serve"
    assert cmd[cmd.index("--policies") + 1] == serve_args.policies


def test_dockerfile_exposes_grpc_port() -> None:
    exposed = [arguments.split() for keyword, arguments in _final_stage() if keyword == "EXPOSE"]

    assert ["9001"] in exposed
    assert _grpc_port() == 9001


def test_dockerfile_installs_package_without_extras() -> None:
    installs = [arguments for keyword, arguments in _dockerfile_instructions()
                if keyword == "RUN" and "pip install" in arguments]

    assert len(installs) == 1
    assert installs[0].split()[-1] == ".", "install the checkout itself, with no extras"
    assert "--no-cache-dir" in installs[0]


def test_dockerignore_excludes_local_state() -> None:
    patterns = {line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")}

    assert ".git" in patterns
    assert ".venv" in patterns
    assert ".pytest_cache" in patterns
    assert "**/__pycache__" in patterns
