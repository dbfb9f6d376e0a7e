"""Run several server processes that share one listening port (`serve --workers N`).

grpcio serves Python code on one core at a time per process, so using more cores takes
more processes. They bind the same port with SO_REUSEPORT, and the kernel spreads new
connections over them. Connections, not requests, are spread: Envoy keeps few HTTP/2
connections, which is why the server limits concurrent streams per connection
(`--max-concurrent-streams`) so that Envoy opens more connections under load, and
recycles connections after `--max-connection-age`, so that each is hashed to a worker
again.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import replace
from multiprocessing.process import BaseProcess

from extauthz.config import ServeConfig

logger = logging.getLogger("extauthz.supervisor")

RESTART_DELAY_S = 1.0
# A worker that exits MAX_EARLY_EXITS times in a row, each within STABLE_AFTER_S of its
# start, stops the server instead of being restarted forever.
STABLE_AFTER_S = 10.0
MAX_EARLY_EXITS = 5
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
MONITOR_INTERVAL_S = 0.5


def run_worker(config: ServeConfig, index: int = 0) -> None:
    """Entry point of one worker process: serve until SIGTERM or SIGINT, then drain."""
    from extauthz.errors import ConfigError
    from extauthz.logs import configure_logging
    from extauthz.server import ExtAuthzServer

    cpu = None
    if config.pin_workers:
        cpus = sorted(os.sched_getaffinity(0))
        cpu = cpus[index % len(cpus)]
        # First, before any thread starts: threads inherit the affinity of their creator.
        os.sched_setaffinity(0, {cpu})
    configure_logging(config.log_level, config.log_format)
    if cpu is not None:
        logger.info("worker %d pinned to CPU %d", index, cpu)
    _stop_with_parent()
    stop_requested = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _signum, _frame: stop_requested.set())
    server = ExtAuthzServer(config)
    try:
        server.start()
    except ConfigError as exc:
        logger.error("%s", exc)
        raise SystemExit(2) from None
    stop_requested.wait()
    server.stop(config.grace_period_s)


def _forget(process: BaseProcess) -> None:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ and process.pid is not None:
        from extauthz import metrics

        metrics.mark_process_dead(process.pid)


def _stop_with_parent() -> None:
    """Ask Linux to send this worker SIGTERM when the supervisor dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        logger.debug("prctl is not available; a killed supervisor leaves its workers running")


class Supervisor:
    """Start `workers` processes, restart any that dies, and stop them all on a signal."""

    def __init__(self, config: ServeConfig, workers: int) -> None:
        # The supervisor serves the metrics of all workers, so the workers serve none.
        self.config = replace(config, metrics_listen=None)
        self.metrics_listen = config.metrics_listen
        self.workers = workers
        self._context = multiprocessing.get_context("spawn")  # no grpc state crosses a fork
        self._processes: list[BaseProcess] = []
        self._stop = threading.Event()

    def _spawn(self, index: int) -> BaseProcess:
        process = self._context.Process(target=run_worker, args=(self.config, index),
                                        name="extauthz-worker", daemon=False)
        process.start()
        logger.info("started worker pid %d", process.pid)
        return process

    def request_stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        metrics_dir = None
        metrics_server = None
        if self.metrics_listen:
            # Set before prometheus-client is imported here or in a worker: it selects
            # the multiprocess mode at import.
            metrics_dir = tempfile.mkdtemp(prefix="extauthz-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
            from extauthz import metrics

            # Importing metrics created this process's own samples (extauthz_ready 0); the
            # supervisor serves no Checks, so they are dropped from what /metrics reports.
            metrics.mark_process_dead(os.getpid())
            metrics_server = metrics.MetricsServer(self.metrics_listen, metrics.ready_from_workers)
            metrics_server.start()
        try:
            return self._run_workers()
        finally:
            if metrics_server is not None:
                metrics_server.stop()
            if metrics_dir is not None:
                shutil.rmtree(metrics_dir, ignore_errors=True)

    def _run_workers(self) -> int:
        self._processes = [self._spawn(index) for index in range(self.workers)]
        started = [time.monotonic()] * self.workers
        early_exits = [0] * self.workers  # consecutive exits soon after a start, per worker
        crash_loop = False
        while not self._stop.wait(MONITOR_INTERVAL_S):
            for index, process in enumerate(self._processes):
                if process.is_alive():
                    continue
                if process.exitcode == 2:
                    logger.error("worker pid %d could not start; stopping", process.pid)
                    self._stop.set()
                    break
                early = time.monotonic() - started[index] < STABLE_AFTER_S
                early_exits[index] = early_exits[index] + 1 if early else 0
                if early_exits[index] >= MAX_EARLY_EXITS:
                    logger.error("worker pid %d exited with code %s, the %dth time within %.0f s of its start; "
                                 "stopping all workers, see the errors above", process.pid, process.exitcode,
                                 early_exits[index], STABLE_AFTER_S)
                    crash_loop = True
                    self._stop.set()
                    break
                logger.error("worker pid %d exited with code %s; restarting it", process.pid, process.exitcode)
                _forget(process)
                if self._stop.wait(RESTART_DELAY_S):  # a signal during the delay starts no new worker
                    break
                self._processes[index] = self._spawn(index)
                started[index] = time.monotonic()
        code = self._shutdown()
        return 1 if crash_loop and code == 0 else code

    def _shutdown(self) -> int:
        for process in self._processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.grace_period_s + 5
        for process in self._processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                logger.warning("worker pid %d did not stop in time; killing it", process.pid)
                process.kill()
                process.join(5)
        for process in self._processes:
            _forget(process)
        failed = [p for p in self._processes if p.exitcode not in (0, -signal.SIGTERM)]
        return 2 if any(p.exitcode == 2 for p in failed) else 0
