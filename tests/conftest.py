"""Test fixtures: one behaviour suite over every backend, and enforced hygiene.

Every test in ``test_behaviour.py`` takes the ``dispatcher`` (or
``make_dispatcher``) fixture and so runs once per backend in ``BACKENDS``. A
new backend joins the suite by adding its name here.

After every test, ``_no_leaks`` fails the test if it left a thread or a child
process running (after giving them a few seconds to end).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

import papyros
from tests.pyro_cluster import SECRET, Cluster, start_nameserver, stop

# Backends whose workers run concurrently with the client.
CONCURRENT_BACKENDS = ["thread", "process", "pyro"]
# Every backend. "dummy" runs tasks inline, in the consumer's own thread.
BACKENDS = ["dummy", *CONCURRENT_BACKENDS]

# Worker count used by the suite: small, but more than one.
WORKERS = 2

# How long leftover threads and processes get to end before a test fails.
_LEAK_GRACE = 10.0

DispatcherFactory = Callable[..., papyros.TaskDispatcher]


def _factory(
    request: pytest.FixtureRequest, backend: str, opened: list[papyros.TaskDispatcher]
) -> DispatcherFactory:
    def make(**settings: object) -> papyros.TaskDispatcher:
        if backend != "dummy":
            settings.setdefault("workers", WORKERS)
        if backend == "pyro":
            dispatcher = _start_pyro_group(request, **settings)
        else:
            dispatcher = papyros.get_dispatcher(backend, **settings)
        opened.append(dispatcher)
        return dispatcher

    return make


def _start_pyro_group(request: pytest.FixtureRequest, **settings: object) -> papyros.TaskDispatcher:
    """A real deployment of a new group: its dispatcher and workers, then a client proxy."""
    papyros.load_config(**settings)  # Bad settings fail here, as on every backend.
    cluster: Cluster = request.getfixturevalue("pyro_cluster")
    group = f"test-{next(_groups)}"
    workers = int(settings.pop("workers"))  # type: ignore[call-overload]
    extra = []
    if settings.get("size"):
        extra = ["--size", str(settings.pop("size"))]
    assert not {k: v for k, v in settings.items() if v}, f"unsupported for pyro: {settings}"
    cluster.start_dispatcher(group, *extra)
    cluster.start_workers(group, workers)
    dispatcher = papyros.get_dispatcher("pyro", group=group, ns_port=cluster.ns_port)
    # Ready when its workers have joined, as a local pool is once made: a test that
    # counts what waits for a worker must not see a late one take some.
    deadline = time.monotonic() + 30
    while len(dispatcher.get_stats()["workers"]) < workers:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, f"the {workers} workers of {group} did not join"
        time.sleep(0.02)
    return dispatcher


_groups = itertools.count()

# Processes that live for the whole session, not a test: not leaks.
_SESSION_PIDS: set[int] = set()


@pytest.fixture(scope="session")
def pyro_nameserver() -> Iterator[int]:
    """A real Pyro5 name server for the whole session; its port."""
    process, port = start_nameserver()
    _SESSION_PIDS.add(process.pid)
    yield port
    stop(process)


@pytest.fixture
def pyro_cluster(
    pyro_nameserver: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Cluster]:
    """Starts dispatchers and workers for a test, and stops them all at its end."""
    monkeypatch.setenv("PAPYROS_SECRET", SECRET)
    logs = tmp_path / "logs"
    logs.mkdir()
    cluster = Cluster(pyro_nameserver, logs)
    yield cluster
    cluster.stop_all()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=CONCURRENT_BACKENDS)
def concurrent_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_dispatcher(request: pytest.FixtureRequest, backend: str) -> Iterator[DispatcherFactory]:
    """A factory of dispatchers of the backend under test, all closed at teardown."""
    opened: list[papyros.TaskDispatcher] = []
    yield _factory(request, backend, opened)
    for dispatcher in opened:
        dispatcher.close()


@pytest.fixture
def make_concurrent_dispatcher(
    request: pytest.FixtureRequest, concurrent_backend: str
) -> Iterator[DispatcherFactory]:
    """Like ``make_dispatcher``, over the backends whose workers run beside the client."""
    opened: list[papyros.TaskDispatcher] = []
    yield _factory(request, concurrent_backend, opened)
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
        children = psutil.Process().children(recursive=True)
        return {child for child in children if child.pid not in _SESSION_PIDS}
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
    # Unclosed sockets and files warn (as errors) here, in the test that leaked them.
    gc.collect()
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
    assert not alive, f"the test leaked child processes: {[_describe(p) for p in alive]}"


def _describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid} {process.status()} {' '.join(process.cmdline())[:200]}"
    except psutil.Error:
        return str(process.pid)
