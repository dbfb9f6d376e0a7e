"""Reload under the ways a policy directory really changes: ConfigMap swaps, bursts, deletion.

Each test runs a real server process on a real directory and reads decisions, and the
policy revision that made them, from gRPC Check responses.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc

from extauthz.policy import revision_of
from tests.support.check_requests import build_check_request
from tests.support.processes import ExtauthzProcess

POLL_S = 0.02


def allow_only(version: int, name: str = "version") -> str:
    """An ALLOW policy for path /v<version>, with a trailing DENY that a truncated write would lose."""
    return textwrap.dedent(f"""\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: {name}
          namespace: demo
        spec:
          rules:
          - to:
            - operation:
                paths: ["/v{version}"]
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: {name}-deny
          namespace: demo
        spec:
          action: DENY
          rules:
          - to:
            - operation:
                paths: ["/never"]
        """)


def allow_only_flow(version: int) -> str:
    """allow_only() as one YAML flow mapping: any prefix of it is invalid YAML.

    A block-style file cut short can still be a valid, different policy, which no reader
    can tell from an intended one; the server's settle check (two equal reads) covers
    short pauses of a writer, and this form lets the test cover longer ones too.
    """
    return json.dumps({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "version", "namespace": "demo"},
        "spec": {"rules": [{"to": [{"operation": {"paths": [f"/v{version}"]}}]}]},
    }, indent=2) + "\n"


def revision_of_files(files: dict[str, str]) -> str:
    """Return the revision id the server reports for a directory holding exactly `files`."""
    directory = Path(next(iter(files))).parent
    return revision_of([(name, text.encode()) for name, text in files.items()], directory)


class Checker:
    """A gRPC channel to the server that returns (allowed, revision) for a path."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = external_auth_pb2_grpc.AuthorizationStub(self.channel)

    def check(self, path: str) -> tuple[bool, str]:
        response = self.stub.Check(build_check_request(path=path), timeout=5)
        return response.status.code == 0, response.dynamic_metadata["revision"]

    def wait_for(self, path: str, allowed: bool, timeout: float) -> float:
        """Poll until the decision for `path` is `allowed`; returns the seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.check(path)[0] == allowed:
                return time.monotonic() - started
            time.sleep(POLL_S)
        raise AssertionError(f"{path} was not {'allowed' if allowed else 'denied'} within {timeout} s")


def reload_count(server: ExtauthzProcess, at_least: int = 0, timeout: float = 5.0) -> int:
    """Count the "loaded policy revision" log lines, waiting up to `timeout` for `at_least`.

    The server logs a load just after swapping the revision in, so a Check can see the
    new revision a moment before its log line is written.
    """
    deadline = time.monotonic() + timeout
    while True:
        count = server.log_text().count("loaded policy revision")
        if count >= at_least or time.monotonic() > deadline:
            return count
        time.sleep(POLL_S)


@pytest.fixture
def configmap(tmp_path: Path) -> Path:
    """A directory laid out like a mounted ConfigMap: ..<timestamp>/, ..data -> it, file -> ..data/file."""
    mount = tmp_path / "mount"
    mount.mkdir()
    first = mount / "..2026_01_01_00_00_00.000000001"
    first.mkdir()
    (first / "policy.yaml").write_text(allow_only(1))
    (mount / "..data").symlink_to(first.name)
    (mount / "policy.yaml").symlink_to("..data/policy.yaml")
    return mount


@pytest.fixture
def served(configmap: Path) -> Iterator[tuple[ExtauthzProcess, Checker]]:
    with ExtauthzProcess(configmap, "--workload-namespace", "demo") as server:
        server.wait_serving()
        checker = Checker(server.address)
        yield server, checker
        checker.channel.close()


def swap_configmap(mount: Path, version: int) -> None:
    """Publish a new version the way the kubelet does: new folder, then an atomic ..data rename."""
    folder = mount / f"..2026_01_01_00_00_{version:02d}.000000001"
    folder.mkdir()
    (folder / "policy.yaml").write_text(allow_only(version))
    temporary_link = mount / "..data_tmp"
    temporary_link.symlink_to(folder.name)
    old = (mount / "..data").resolve()
    os.rename(temporary_link, mount / "..data")
    shutil.rmtree(old)


def test_configmap_swap_picked_up(served: tuple[ExtauthzProcess, Checker], configmap: Path) -> None:
    server, checker = served
    assert checker.check("/v1")[0]
    swap_configmap(configmap, 2)
    elapsed = checker.wait_for("/v2", allowed=True, timeout=2.0)
    assert not checker.check("/v1")[0]
    assert reload_count(server, at_least=2) == 2
    print(f"ConfigMap swap decided the next Check after {elapsed:.3f} s")


def test_rapid_writes_never_serve_partial_file(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(allow_only_flow(0))
    complete = {revision_of_files({str(policy): allow_only_flow(v)}): v for v in range(100)}
    with ExtauthzProcess(tmp_path, "--workload-namespace", "demo") as server:
        server.wait_serving()
        checker = Checker(server.address)
        observed: list[tuple[bool, str]] = []
        stop = threading.Event()

        def keep_checking() -> None:
            while not stop.is_set():
                observed.append(checker.check("/v99"))

        thread = threading.Thread(target=keep_checking)
        thread.start()
        try:
            for version in range(1, 100):
                text = allow_only_flow(version)
                with policy.open("w") as handle:  # written in two halves, as a slow editor would
                    handle.write(text[: len(text) // 2])
                    handle.flush()
                    time.sleep(0.001)
                    handle.write(text[len(text) // 2:])
            checker.wait_for("/v99", allowed=True, timeout=10.0)
        finally:
            stop.set()
            thread.join(timeout=10)
            checker.channel.close()
        reloads = reload_count(server)
    assert all(revision in complete for _, revision in observed), "a decision came from an unknown revision"
    assert all(allowed == (complete[revision] == 99) for allowed, revision in observed)
    assert 2 <= reloads <= 20, reloads  # the first load, then a few for the whole burst
    print(f"100 writes caused {reloads - 1} reload(s); {len(observed)} Checks during the burst")


def test_directory_deleted_and_recreated(tmp_path: Path) -> None:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "policy.yaml").write_text(allow_only(1))
    with ExtauthzProcess(directory, "--workload-namespace", "demo") as server:
        server.wait_serving()
        checker = Checker(server.address)
        try:
            shutil.rmtree(directory)
            deadline = time.monotonic() + 10
            while "policy directory does not exist" not in server.log_text() and time.monotonic() < deadline:
                time.sleep(POLL_S)
            assert "policy directory does not exist" in server.log_text()
            assert checker.check("/v1")[0]  # the last good revision keeps serving

            directory.mkdir()
            (directory / "policy.yaml").write_text(allow_only(2))
            checker.wait_for("/v2", allowed=True, timeout=10.0)
            assert not checker.check("/v1")[0]
        finally:
            checker.channel.close()


def test_checks_during_50_reloads_see_whole_revisions(tmp_path: Path) -> None:
    # Two files per version, which must change together: a.yaml allows /v<n> and b.yaml
    # allows /w<n>. A Check that saw a.yaml of one version and b.yaml of another would
    # contradict the revision it reports.
    def files(version: int) -> dict[str, str]:
        return {str(tmp_path / "a.yaml"): allow_only(version, "a"),
                str(tmp_path / "b.yaml"): allow_only(version + 1000, "b")}

    # A Check may also land between the two renames: that directory state is a whole
    # revision too, with a.yaml of the new version and b.yaml of the previous one.
    revisions = {revision_of_files(files(v)): (v, v) for v in range(51)}
    for version in range(1, 51):
        between = {**files(version - 1), str(tmp_path / "a.yaml"): allow_only(version, "a")}
        revisions[revision_of_files(between)] = (version, version - 1)
    for name, text in files(0).items():
        Path(name).write_text(text)
    with ExtauthzProcess(tmp_path, "--workload-namespace", "demo") as server:
        server.wait_serving()
        checker = Checker(server.address)
        observed: list[tuple[str, bool, str]] = []
        errors: list[BaseException] = []
        stop = threading.Event()

        def keep_checking() -> None:
            index = 0
            while not stop.is_set():
                version = index % 51
                path = f"/v{version}" if index % 2 else f"/v{version + 1000}"
                try:
                    allowed, revision = checker.check(path)
                except grpc.RpcError as exc:
                    errors.append(exc)
                    continue
                observed.append((path, allowed, revision))
                index += 1

        thread = threading.Thread(target=keep_checking)
        thread.start()
        try:
            for version in range(1, 51):
                for name, text in files(version).items():
                    staging = Path(name + ".tmp")  # not a policy file: only *.yaml and *.yml are read
                    staging.write_text(text)
                    os.rename(staging, name)
                checker.wait_for(f"/v{version}", allowed=True, timeout=10.0)
                checker.wait_for(f"/v{version + 1000}", allowed=True, timeout=10.0)
        finally:
            stop.set()
            thread.join(timeout=10)
            checker.channel.close()
        reloads = reload_count(server, at_least=51) - 1
    assert not errors
    assert observed
    for path, allowed, revision in observed:
        assert revision in revisions, f"{path} decided by unknown revision {revision}"
        a_version, b_version = revisions[revision]
        # In a whole revision, exactly the paths its two files name are allowed.
        assert allowed == (path in (f"/v{a_version}", f"/v{b_version + 1000}")), (path, revision)
    assert reloads >= 50
    print(f"{reloads} reloads, {len(observed)} Checks, all from whole revisions")
