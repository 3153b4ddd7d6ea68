"""Test fixtures: one behaviour suite over every backend, and enforced hygiene.

Every test in ``test_behaviour.py`` takes the ``dispatcher`` (or
``make_dispatcher``) fixture and so runs once per backend in ``BACKENDS``. A
new backend joins the suite by adding its name here.

After every test, ``_no_leaks`` fails the test if it left a thread or a child
process running (after giving them a few seconds to end).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import psutil
import pytest

import papyros

# Backends whose workers run concurrently with the client.
CONCURRENT_BACKENDS = ["thread", "process"]
# Every backend. "dummy" runs tasks inline, in the consumer's own thread.
BACKENDS = ["dummy", *CONCURRENT_BACKENDS]

# Worker count used by the suite: small, but more than one.
WORKERS = 2

# How long leftover threads and processes get to end before a test fails.
_LEAK_GRACE = 10.0

DispatcherFactory = Callable[..., papyros.TaskDispatcher]


def _factory(backend: str, opened: list[papyros.TaskDispatcher]) -> DispatcherFactory:
    def make(**settings: object) -> papyros.TaskDispatcher:
        if backend != "dummy":
            settings.setdefault("workers", WORKERS)
        dispatcher = papyros.get_dispatcher(backend, **settings)
        opened.append(dispatcher)
        return dispatcher

    return make


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=CONCURRENT_BACKENDS)
def concurrent_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_dispatcher(backend: str) -> Iterator[DispatcherFactory]:
    """A factory of dispatchers of the backend under test, all closed at teardown."""
    opened: list[papyros.TaskDispatcher] = []
    yield _factory(backend, opened)
    for dispatcher in opened:
        dispatcher.close()


@pytest.fixture
def make_concurrent_dispatcher(concurrent_backend: str) -> Iterator[DispatcherFactory]:
    """Like ``make_dispatcher``, over the backends whose workers run beside the client."""
    opened: list[papyros.TaskDispatcher] = []
    yield _factory(concurrent_backend, opened)
    for dispatcher in opened:
        dispatcher.close()


@pytest.fixture
def dispatcher(make_dispatcher: DispatcherFactory) -> papyros.TaskDispatcher:
    return make_dispatcher()


@pytest.fixture
def concurrent_dispatcher(make_concurrent_dispatcher: DispatcherFactory) -> papyros.TaskDispatcher:
    return make_concurrent_dispatcher()


def _children() -> set[psutil.Process]:
    try:
        return set(psutil.Process().children(recursive=True))
    except psutil.Error:
        return set()


@pytest.fixture(scope="session", autouse=True)
def _resource_tracker() -> None:
    """Start multiprocessing's resource tracker once, before any test counts child processes.

    Like the forkserver, it is a per-interpreter helper that lives as long as
    the test run; the ``spawn`` start method starts it with the first worker.
    """
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    """Fail a test that leaves threads or child processes behind."""
    threads_before = set(threading.enumerate())
    children_before = _children()
    yield
    deadline = time.monotonic() + _LEAK_GRACE
    leaked_threads = []
    for thread in set(threading.enumerate()) - threads_before:
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            leaked_threads.append(thread.name)
    new_children = _children() - children_before
    _, alive = psutil.wait_procs(list(new_children), timeout=max(0.0, deadline - time.monotonic()))
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    assert not leaked_threads, f"the test leaked threads: {leaked_threads}"
    assert not alive, f"the test leaked child processes: {[p.pid for p in alive]}"
