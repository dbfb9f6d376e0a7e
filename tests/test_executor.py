"""The handler thread pool: calls run on its threads, callbacks fire once, failures are logged."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest

from extauthz.executor import CallFuture, HandlerExecutor

WAIT_S = 5.0


@pytest.fixture
def executor() -> Iterator[HandlerExecutor]:
    pool = HandlerExecutor(2, "test")
    yield pool
    pool.shutdown(wait=True)


def test_call_runs_on_pool_thread(executor: HandlerExecutor) -> None:
    ran = threading.Event()
    names: list[str] = []

    def call(value: int, *, label: str) -> None:
        names.append(f"{threading.current_thread().name}:{value}:{label}")
        ran.set()

    executor.submit(call, 7, label="x")

    assert ran.wait(WAIT_S)
    assert names[0].startswith("test_")
    assert names[0].endswith(":7:x")


def test_callback_runs_after_the_call(executor: HandlerExecutor) -> None:
    release = threading.Event()
    called = threading.Event()
    seen: list[CallFuture] = []
    future = executor.submit(release.wait, WAIT_S)

    def on_done(done: CallFuture) -> None:
        seen.append(done)
        called.set()

    future.add_done_callback(on_done)
    assert not called.is_set()  # the call still waits for `release`
    release.set()

    assert called.wait(WAIT_S)
    assert seen == [future]
    assert future.done()


def test_late_callback_runs_at_once(executor: HandlerExecutor) -> None:
    future = executor.submit(lambda: None)
    finished = threading.Event()
    future.add_done_callback(lambda _: finished.set())
    assert finished.wait(WAIT_S)
    seen: list[CallFuture] = []

    future.add_done_callback(seen.append)  # the call has ended, so this runs in this thread

    assert seen == [future]


def test_failing_call_keeps_pool_running(executor: HandlerExecutor,
                                         caplog: pytest.LogCaptureFixture) -> None:
    def fail() -> None:
        raise RuntimeError("handler bug")

    failed = executor.submit(fail)
    done = threading.Event()
    failed.add_done_callback(lambda _: done.set())
    assert done.wait(WAIT_S)
    results: list[int] = []
    after = threading.Event()

    for value in range(4):  # both threads still take calls
        executor.submit(results.append, value)
    executor.submit(after.set)

    assert after.wait(WAIT_S)
    assert sorted(results) == [0, 1, 2, 3]
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert str(errors[0].exc_info[1]) == "handler bug"


def test_shutdown_runs_queued_calls_first() -> None:
    pool = HandlerExecutor(1, "stop")
    gate = threading.Event()
    order: list[str] = []
    pool.submit(gate.wait, WAIT_S)
    pool.submit(order.append, "queued")

    gate.set()
    pool.shutdown(wait=True)

    assert order == ["queued"]
    assert not any(thread.name.startswith("stop_") for thread in threading.enumerate())


def test_zero_threads_rejected() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        HandlerExecutor(0, "none")
