"""Policy validation: every rejected document names its file, line and field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from extauthz.errors import PolicyError
from extauthz.policy import load_policy_dir


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def problems_of(directory: Path) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_policy_dir(directory)
    return [str(p) for p in caught.value.problems if p.severity == "error"]


AP_HEADER = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: bad
  namespace: foo
"""


@pytest.mark.parametrize(
    ("spec", "line", "expected"),
    [
        ("spec:\n  action: DENY\n", 7, "spec.rules: DENY without rules"),
        ("spec:\n  rules:\n  - to:\n    - operation: {}\n", 9, "spec.rules[0].to[0].operation: empty operation"),
        ("spec:\n  rules:\n  - when:\n    - key: request.foo\n      values: [x]\n", 9, "unknown key 'request.foo'"),
        ("spec:\n  rules:\n  - to:\n    - operation:\n        paths: ['/foo/{*}.txt']\n", 10,
         "invalid path template '/foo/{*}.txt'"),
        ("spec:\n  selector:\n    matchLabels: {app: a}\n  targetRefs:\n  - {kind: Gateway, name: gw}\n", 9,
         "selector and targetRefs are set together"),
        ("spec:\n  rules:\n  - from:\n    - source:\n        ipBlocks: [10.0.0.0/33]\n", 10,
         "'10.0.0.0/33' is not an IP address or CIDR block"),
        ("spec:\n  rules:\n  - to:\n    - operation:\n        ports: [http]\n", 10, "'http' is not a port number"),
        ("spec:\n  rules:\n  - when:\n    - key: destination.labels[app]\n      values: [x]\n", 9,
         "use spec.selector to choose workloads"),
        ("spec:\n  rules:\n  - from: []\n", 8, "'from' must be a non-empty list"),
        ("spec:\n  rules:\n  - when:\n    - key: request.headers[x-a]\n", 9, "needs values or notValues"),
        ("spec:\n  rules:\n  - to:\n    - operation:\n        methods: ['']\n", 10, "empty string"),
        ("spec:\n  action: CUSTOM\n  provider: {name: x}\n  rules: [{}]\n", 7, "CUSTOM is not supported"),
        ("spec:\n  action: ALLOW\n  provider: {name: x}\n", 8, "provider is only allowed with action CUSTOM"),
        ("spec:\n  rules:\n  - to:\n    - operation:\n        pathz: [/a]\n", 10, "unknown field 'pathz'"),
        ("spec:\n  action: allow\n", 7, "unknown action 'allow'"),
        ("spec:\n  selector:\n    matchLabels: {app: '*'}\n", 8, "must be a string without wildcards"),
    ],
)
def test_authorization_policy_rejected(tmp_path: Path, spec: str, line: int, expected: str) -> None:
    path = write(tmp_path, "policy.yaml", AP_HEADER + spec)
    problems = problems_of(tmp_path)
    assert problems, "the policy must be rejected"
    assert problems[0].startswith(f"{path}:{line}: AuthorizationPolicy/foo/bad: "), problems
    assert expected in problems[0]


RA_HEADER = """\
apiVersion: security.istio.io/v1beta1
kind: RequestAuthentication
metadata:
  name: jwt
  namespace: foo
spec:
  jwtRules:
"""


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("  - audiences: [a]\n", "needs an issuer or a jwksUri"),
        ("  - issuer: x\n    jwksUri: ftp://x/keys\n", "is not an http:// or https:// URL"),
        ("  - issuer: x\n    jwks: '{\"keys\": '\n", "inline jwks is not valid JSON"),
        ("  - issuer: x\n    jwks: '{}'\n", 'a "keys" list'),
        ("  - issuer: https://x\n    outputClaimToHeaders:\n    - {header: 'bad header', claim: sub}\n",
         "'bad header' is not a valid HTTP header name"),
        ("  - issuer: https://x\n    outputClaimToHeaders:\n    - {header: x-a, claim: sub}\n"
         "    - {header: X-A, claim: iss}\n", "each output header must be unique"),
        ("  - issuer: https://x\n    timeout: soon\n", "invalid duration 'soon'"),
        ("  - issuer: https://x\n    failureMode: LAX\n", "unknown failureMode 'LAX'"),
        ("  - issuer: https://x\n    audience: [a]\n", "unknown field 'audience'"),
        ("  - issuer: https://x\n    fromHeaders:\n    - prefix: 'Bearer '\n", "None is not a valid HTTP header name"),
    ],
)
def test_request_authentication_rejected(tmp_path: Path, rule: str, expected: str) -> None:
    write(tmp_path, "ra.yaml", RA_HEADER + rule)
    problems = problems_of(tmp_path)
    assert problems
    assert "RequestAuthentication/foo/jwt: spec.jwtRules[0]" in problems[0]
    assert expected in problems[0]


def test_missing_namespace_rejected(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: a\n")
    (problem,) = problems_of(tmp_path)
    assert "metadata.namespace" in problem
    assert "never guessed" in problem


def test_unknown_kind_rejected(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
                              "metadata: {name: a, namespace: b}\n")
    (problem,) = problems_of(tmp_path)
    assert problem.endswith("a.yaml:2: kind: unsupported kind 'PeerAuthentication'; expected one of "
                            "RequestAuthentication, AuthorizationPolicy (keep other resources out of the "
                            "policy directory)")


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "a.yaml", AP_HEADER + "spec:\n  rules: [\n  action: DENY\n")
    (problem,) = problems_of(tmp_path)
    assert problem.startswith(f"{path}:")
    assert "invalid YAML" in problem


def test_duplicate_policy_rejected(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", AP_HEADER + "spec: {}\n")
    write(tmp_path, "b.yaml", AP_HEADER + "spec: {}\n")
    (problem,) = problems_of(tmp_path)
    assert "defined twice" in problem


def test_one_invalid_file_rejects_whole_set(tmp_path: Path) -> None:
    write(tmp_path, "good.yaml", AP_HEADER.replace("bad", "good") + "spec: {}\n")
    write(tmp_path, "sub/bad.yaml", AP_HEADER + "spec:\n  action: DENY\n")
    problems = problems_of(tmp_path)
    assert len(problems) == 1
    assert "sub/bad.yaml:7" in problems[0]


def test_list_and_multi_document_files_load(tmp_path: Path) -> None:
    write(tmp_path, "list.yml", """
        apiVersion: v1
        kind: List
        items:
        - apiVersion: security.istio.io/v1
          kind: AuthorizationPolicy
          metadata: {name: one, namespace: foo}
          spec: {}
        """)
    write(tmp_path, "multi.yaml", AP_HEADER.replace("bad", "two") + "spec: {}\n---\n"
          + AP_HEADER.replace("bad", "three") + "spec:\n  action: AUDIT\n")
    policy_set = load_policy_dir(tmp_path)
    names = sorted(ap.ref.name for ap in policy_set.authorization_policies)
    assert names == ["one", "three", "two"]


def test_hidden_and_configmap_internal_entries_skipped(tmp_path: Path) -> None:
    data = tmp_path / "..2026_12_04_10_00_00.123"
    write(data, "policy.yaml", AP_HEADER.replace("bad", "mounted") + "spec: {}\n")
    (tmp_path / "..data").symlink_to(data.name)
    (tmp_path / "policy.yaml").symlink_to("..data/policy.yaml")
    write(tmp_path, ".policy.yaml.swp", "not yaml: [")
    policy_set = load_policy_dir(tmp_path)
    assert [ap.ref.name for ap in policy_set.authorization_policies] == ["mounted"]


def test_empty_selector_is_a_warning(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", AP_HEADER + "spec:\n  selector: {}\n")
    policy_set = load_policy_dir(tmp_path)
    assert len(policy_set.authorization_policies) == 1
    assert any("empty selector" in warning for warning in policy_set.warnings)


def test_revision_follows_content(tmp_path: Path) -> None:
    path = write(tmp_path, "a.yaml", AP_HEADER + "spec: {}\n")
    first = load_policy_dir(tmp_path).revision
    path.write_text(path.read_text())
    assert load_policy_dir(tmp_path).revision == first
    path.write_text(path.read_text() + "# changed\n")
    assert load_policy_dir(tmp_path).revision != first


def test_missing_directory_rejected(tmp_path: Path) -> None:
    (problem,) = problems_of(tmp_path / "absent")
    assert "policy directory does not exist" in problem


def test_empty_file_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "a.yaml", AP_HEADER + "spec: {}\n")
    write(tmp_path, "b.yaml", "# only a comment\n")
    (problem,) = problems_of(tmp_path)
    assert problem == f"{tmp_path / 'b.yaml'}:1: file has no YAML documents; delete the file to remove its policies"
    assert path.exists()


def test_misspelled_field_reported_once(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", AP_HEADER + "spec:\n  rules:\n  - to:\n    - operation:\n        method: [GET]\n")
    (problem,) = problems_of(tmp_path)
    assert "unknown field 'method'; known fields here: hosts, methods" in problem


def test_other_kind_reported_by_kind_only(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata:\n  a: b\n")
    (problem,) = problems_of(tmp_path)
    assert "unsupported kind 'ConfigMap'" in problem
    assert "keep other resources out of the policy directory" in problem


def test_tab_indentation_explained(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", AP_HEADER + "spec:\n\trules: []\n")
    (problem,) = problems_of(tmp_path)
    assert "a.yaml:7: invalid YAML" in problem
    assert "(column 1)" in problem
    assert "YAML does not allow tabs for indentation, use spaces" in problem
