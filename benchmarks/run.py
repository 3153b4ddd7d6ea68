"""Time papyros against peer libraries, in one run, on one machine.

Usage::

    python benchmarks/run.py                          # every backend group, full sizes
    python benchmarks/run.py --backends pyro          # the distributed backend only
    python benchmarks/run.py --backends thread --quick
    python benchmarks/run.py --workloads W1,W4 --markdown benchmarks/results.md

Runners are grouped by backend. A group has one papyros runner and its peers,
and each peer's number is compared with papyros's in the same group, as the
ratio papyros / peer. The pools of a group are all started (and warmed up)
together, and each measurement is taken in rounds that visit every runner in
turn, so that a change in the machine's load hits them all alike::

    backend   papyros runner                     peers
    -------   --------------                     -----
    thread    MultiThreadedTaskDispatcher(2)     ThreadPoolExecutor(2), a serial loop
    process   MultiProcessTaskDispatcher(2)      multiprocessing.Pool(2), ProcessPoolExecutor(2),
                                                 loky.ProcessPoolExecutor(2)
    pyro      a deployment on 127.0.0.1: name    Dask distributed (LocalCluster, 2 worker
              server, dispatcher, workers -n 2,  processes), Parallel Python (pp.Server,
              and get_dispatcher("pyro") to it   2 local workers)

The ``process`` and ``pyro`` groups also have a W2-only row, bare processes
taking the tasks from a count in shared memory: the ceiling the machine allowed.

The workloads (``--quick`` makes them about ten times smaller):

    W1  100,000 no-op tasks, at chunksize 1 and 1,000          tasks/s
    W2  400 tasks of ~10 ms of pure-Python CPU on 2 workers    parallel efficiency
    W3  200 tasks, each taking and returning 1 MB of bytes     MB/s
    W4  (a) start-up to the first result; (b) round trip of    milliseconds, microseconds
        one task on a warm pool

Extension point: ``BACKENDS`` maps a backend name to its runners, papyros's
first; a runner is a :class:`Runner` subclass and makes one row of every table
of the workloads it runs.
The Pyro backend (against Dask distributed and Parallel Python) came in as one
more entry, without touching the harness.

Worker processes find the task functions by name, so they live in
``workloads.py`` (plain functions, for the peers) and ``papyros_tasks.py``
(papyros Task types), never here. Spawned workers re-import this file as their
main module, so it imports only the standard library at module level (papyros,
loky, distributed and pp are imported when used) and runs nothing outside ``main()``.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import datetime
import faulthandler
import importlib.metadata
import itertools
import math
import multiprocessing
import os
import platform
import queue
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from papyros import Task, TaskDispatcher, TaskQueue

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent


def _import_from(*folders: Path) -> None:
    """Make modules in ``folders`` importable here and in every child process.

    ``sys.path`` serves this process; ``PYTHONPATH`` is read by each child
    interpreter at start, whatever library starts it and however.
    """
    python_path = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    for folder in reversed(folders):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
        if str(folder) not in python_path:
            python_path.insert(0, str(folder))
    os.environ["PYTHONPATH"] = os.pathsep.join(python_path)


# benchmarks/ for the task modules; the repository root so that the papyros of
# this checkout is the one measured, installed or not.
_import_from(BENCHMARKS_DIR, REPO_ROOT)

import workloads  # noqa: E402  (needs the path set up above; standard library only)

# ---------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Sizes:
    """How much work each workload does."""

    w1_tasks: int = 100_000
    w1_chunksizes: tuple[int, ...] = (1, 1_000)
    w2_tasks: int = 400
    w2_task_seconds: float = 0.010  # the CPU time of one task that calibration aims at
    w3_tasks: int = 200
    w3_payload_bytes: int = 1_000_000  # 1 MB; MB here are 10**6 bytes
    w4_startups: int = 7  # fresh pools built; the median is reported
    w4_round_trips: int = 2_000  # the median is reported
    warm_up_tasks: int = 1_000  # no-op tasks run, untimed, on each pool before measuring

    def quick(self) -> Sizes:
        """About a tenth of the work, for a smoke test."""
        return replace(
            self,
            w1_tasks=10_000,
            w2_tasks=40,
            w3_tasks=20,
            w4_startups=3,
            w4_round_trips=200,
            warm_up_tasks=100,
        )


@dataclass
class Settings:
    """Everything a measurement needs: the command line, the sizes and the calibration."""

    workers: int
    start_method: str
    repeat: int  # runs of each throughput measurement; the best is reported
    sizes: Sizes
    # Set by calibrate() before any measurement:
    spin_loops: int = 0  # W2: loops that take one task ~w2_task_seconds
    spin_task_seconds: float = 0.0  # W2: the CPU time of one task (best of SPIN_SAMPLES)
    spin_serial_seconds: float = 0.0  # W2: the serial time of all the tasks
    spin_result: int = 0  # W2: what spin(spin_loops) returns


# ---------------------------------------------------------------------------- runners


class Unavailable(Exception):
    """A runner, or a whole backend, cannot run here; the message says why."""


class NotApplicable(Exception):
    """A measurement that means nothing for this runner (a loop has no pool to start)."""


class Runner(ABC):
    """One row of every table: one way of running the workloads' tasks.

    Between :meth:`start` and :meth:`stop` a runner holds a warm pool, and the
    workload methods run on it; :meth:`w4_startup` alone builds pools of its
    own. ``w1``-``w3`` return an aggregate of the results, which the harness
    checks, so a runner that loses or repeats tasks fails loudly instead of
    looking fast.
    """

    #: The row's name in the tables.
    label: ClassVar[str]
    #: True for the row that the other rows of its backend are compared with.
    is_papyros: ClassVar[bool] = False
    #: Footnotes for the tables, by workload name ("W1").
    notes: ClassVar[dict[str, str]] = {}
    #: The workloads this runner runs, by name; None for all of them.
    runs: ClassVar[frozenset[str] | None] = None

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def check(self) -> None:  # noqa: B027  (optional: most runners can always run)
        """Raise :class:`Unavailable` if this runner cannot run here (e.g. a missing library)."""

    @abstractmethod
    def start(self) -> None:
        """Build the warm pool that the workload methods use."""

    @abstractmethod
    def stop(self) -> None:
        """Shut the warm pool down, waiting for its workers."""

    def warm_up(self) -> None:
        """Untimed, after :meth:`start`: start the workers that start lazily, import the task
        modules in them."""
        self.w1(self.settings.sizes.warm_up_tasks, 1)

    @abstractmethod
    def w1(self, ntasks: int, chunksize: int) -> int:
        """Run ``noop(i)`` for each ``i < ntasks``; return the sum of the results."""

    @abstractmethod
    def w2(self, ntasks: int, loops: int) -> int:
        """Run ``spin(loops)`` ``ntasks`` times; return the sum of the results."""

    @abstractmethod
    def w3(self, ntasks: int, payload: bytes) -> int:
        """Run ``echo(payload)`` ``ntasks`` times; return the total length of the results."""

    @abstractmethod
    def w4_startup(self) -> float:
        """Seconds from building a fresh pool to the result of ``noop(1)``; shutdown is untimed."""

    @abstractmethod
    def w4_round_trip(self) -> int:
        """Send ``noop(1)`` to the warm pool and wait for its result; return it."""


class PapyrosRunner(Runner):
    """A papyros backend, found by its registry name, as ``get_dispatcher`` finds it.

    The class is built directly rather than through ``papyros.get_dispatcher``,
    so that a ``papyros.toml`` or ``PAPYROS_*`` variable in the environment
    cannot change what is measured.
    """

    is_papyros = True
    #: The backend's name in the papyros registry.
    backend: ClassVar[str]

    def dispatcher_options(self) -> dict[str, Any]:
        """The keyword arguments of the dispatcher class."""
        return {"num_workers": self.settings.workers}

    def check(self) -> None:
        import papyros
        from papyros.registry import load_backend

        try:
            self._dispatcher_class = load_backend(self.backend)
        except papyros.PapyrosError as exc:
            raise Unavailable(f"papyros cannot provide it: {exc}") from exc

    def make_dispatcher(self) -> TaskDispatcher:
        return self._dispatcher_class(**self.dispatcher_options())

    def start(self) -> None:
        import papyros_tasks

        # Bound here once, so that no measured loop pays for an import statement.
        self._noop: type[Task] = papyros_tasks.noop
        self._spin: type[Task] = papyros_tasks.spin
        self._echo: type[Task] = papyros_tasks.echo
        self._dispatcher = self.make_dispatcher()
        self._queue: TaskQueue = self._dispatcher.make_queue()

    def stop(self) -> None:
        self._dispatcher.close()

    def w1(self, ntasks: int, chunksize: int) -> int:
        noop = self._noop
        return sum(self._dispatcher.execute((noop(i) for i in range(ntasks)), chunksize=chunksize))

    def w2(self, ntasks: int, loops: int) -> int:
        spin = self._spin
        return sum(self._dispatcher.execute(spin(loops) for _ in range(ntasks)))

    def w3(self, ntasks: int, payload: bytes) -> int:
        echo = self._echo
        return sum(map(len, self._dispatcher.execute(echo(payload) for _ in range(ntasks))))

    def w4_startup(self) -> float:
        start = time.perf_counter()
        dispatcher = self.make_dispatcher()
        try:
            queue = dispatcher.make_queue()
            queue.push(self._noop(1))
            queue.pop()
            return time.perf_counter() - start
        finally:
            dispatcher.close()

    def w4_round_trip(self) -> int:
        self._queue.push(self._noop(1))
        return self._queue.pop()  # type: ignore[no-any-return]


class PapyrosThreadRunner(PapyrosRunner):
    label = "papyros thread"
    backend = "thread"


class PapyrosProcessRunner(PapyrosRunner):
    label = "papyros process"
    backend = "process"

    def dispatcher_options(self) -> dict[str, Any]:
        return {**super().dispatcher_options(), "start_method": self.settings.start_method}


class ExecutorRunner(Runner):
    """A ``concurrent.futures.Executor``: ``map`` for throughput, ``submit`` for latency."""

    @abstractmethod
    def make_executor(self) -> concurrent.futures.Executor:
        """A fresh executor with ``settings.workers`` workers."""

    def start(self) -> None:
        self._executor = self.make_executor()

    def stop(self) -> None:
        self._executor.shutdown(wait=True)

    def w1(self, ntasks: int, chunksize: int) -> int:
        return sum(self._executor.map(workloads.noop, range(ntasks), chunksize=chunksize))

    def w2(self, ntasks: int, loops: int) -> int:
        return sum(self._executor.map(workloads.spin, itertools.repeat(loops, ntasks)))

    def w3(self, ntasks: int, payload: bytes) -> int:
        return sum(map(len, self._executor.map(workloads.echo, itertools.repeat(payload, ntasks))))

    def w4_startup(self) -> float:
        start = time.perf_counter()
        executor = self.make_executor()
        try:
            executor.submit(workloads.noop, 1).result()
            return time.perf_counter() - start
        finally:
            executor.shutdown(wait=True)

    def w4_round_trip(self) -> int:
        return self._executor.submit(workloads.noop, 1).result()


class ThreadPoolRunner(ExecutorRunner):
    label = "ThreadPoolExecutor"
    notes: ClassVar[dict[str, str]] = {
        "W1": "ThreadPoolExecutor.map has no chunking (it ignores chunksize): "
        "every column runs its plain map.",
    }

    def make_executor(self) -> concurrent.futures.Executor:
        return concurrent.futures.ThreadPoolExecutor(self.settings.workers)


class ProcessPoolRunner(ExecutorRunner):
    label = "ProcessPoolExecutor"

    def make_executor(self) -> concurrent.futures.Executor:
        context = multiprocessing.get_context(self.settings.start_method)
        return concurrent.futures.ProcessPoolExecutor(self.settings.workers, mp_context=context)


class LokyRunner(ExecutorRunner):
    label = "loky"

    def check(self) -> None:
        try:
            import loky  # type: ignore[import-untyped]  # noqa: F401
        except ImportError as exc:
            raise Unavailable(
                "loky is not installed: pip install -e '.[bench]' (or pip install loky)"
            ) from exc
        if self.settings.start_method == "fork":
            raise Unavailable("loky refuses the 'fork' start method")

    def make_executor(self) -> concurrent.futures.Executor:
        import loky
        from loky.backend.context import get_context  # type: ignore[import-untyped]

        return loky.ProcessPoolExecutor(  # type: ignore[no-any-return]
            self.settings.workers, context=get_context(self.settings.start_method)
        )


class MultiprocessingPoolRunner(Runner):
    """``multiprocessing.Pool``: ``imap_unordered`` for throughput, ``apply`` for latency."""

    label = "multiprocessing.Pool"

    def make_pool(self) -> Any:
        context = multiprocessing.get_context(self.settings.start_method)
        return context.Pool(self.settings.workers)

    def start(self) -> None:
        self._pool = self.make_pool()

    def stop(self) -> None:
        self._pool.close()
        self._pool.join()

    def w1(self, ntasks: int, chunksize: int) -> int:
        return sum(self._pool.imap_unordered(workloads.noop, range(ntasks), chunksize=chunksize))

    def w2(self, ntasks: int, loops: int) -> int:
        return sum(self._pool.imap_unordered(workloads.spin, itertools.repeat(loops, ntasks)))

    def w3(self, ntasks: int, payload: bytes) -> int:
        results = self._pool.imap_unordered(workloads.echo, itertools.repeat(payload, ntasks))
        return sum(map(len, results))

    def w4_startup(self) -> float:
        start = time.perf_counter()
        pool = self.make_pool()
        try:
            pool.apply(workloads.noop, (1,))
            return time.perf_counter() - start
        finally:
            pool.close()
            pool.join()

    def w4_round_trip(self) -> int:
        return self._pool.apply(workloads.noop, (1,))  # type: ignore[no-any-return]


class SerialRunner(Runner):
    """A plain Python loop calling the function: the floor of overhead, one core."""

    label = "serial loop"
    notes: ClassVar[dict[str, str]] = {
        "W1": "serial loop: no workers, no chunks; every column is the same loop.",
        "W2": "serial loop: its time is the reference of every efficiency (see above).",
        "W4": "serial loop: no pool to start and nothing to send.",
    }

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def w1(self, ntasks: int, chunksize: int) -> int:
        noop = workloads.noop
        total = 0
        for i in range(ntasks):
            total += noop(i)
        return total

    def w2(self, ntasks: int, loops: int) -> int:
        # The serial time is the reference of every efficiency already (it would
        # come out at 100% / workers): timing it again would only cost ~10 s.
        raise NotApplicable("the serial time is the reference")

    def w3(self, ntasks: int, payload: bytes) -> int:
        echo = workloads.echo
        total = 0
        for _ in range(ntasks):
            total += len(echo(payload))
        return total

    def w4_startup(self) -> float:
        raise NotApplicable("no pool")

    def w4_round_trip(self) -> int:
        raise NotApplicable("no pool")


class BareProcessesRunner(Runner):
    """W2's ceiling: plain processes taking tasks from a count in shared memory.

    No framework and no message per task: a task costs a lock and an integer
    in shared memory, and the processes balance by themselves. The
    efficiency it gets is what the machine allows at that moment (two busy
    cores may each run slower than one alone, and one slower than the other),
    so the other rows can be read against it.
    """

    label = "bare processes (ceiling)"
    notes: ClassVar[dict[str, str]] = {
        "W2": "bare processes (ceiling): no framework; as many plain processes as workers "
        "(started with the same start method) take the tasks one at a time from a count in "
        "shared memory, under a lock, run spin for each and send back one number each. Its "
        "efficiency is what the machine allowed; papyros/peer in its row is papyros's share "
        "of that ceiling.",
    }
    runs: ClassVar[frozenset[str] | None] = frozenset({"W2"})

    def start(self) -> None:
        context = multiprocessing.get_context(self.settings.start_method)
        self._lock = context.Lock()
        self._taken = context.RawValue("q", 0)
        self._connections: list[Any] = []
        self._processes: list[Any] = []
        for _ in range(self.settings.workers):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=workloads.spin_server, args=(theirs, self._taken, self._lock), daemon=True
            )
            process.start()
            theirs.close()
            self._connections.append(ours)
            self._processes.append(process)

    def stop(self) -> None:
        for connection in self._connections:
            connection.send(None)
        for process in self._processes:
            process.join(10.0)  # It stops as soon as it reads None; a stuck one is killed.
            if process.is_alive():
                process.kill()
                process.join()
        for connection in self._connections:
            connection.close()

    def warm_up(self) -> None:
        self.w2(len(self._processes), 1)

    def w1(self, ntasks: int, chunksize: int) -> int:
        raise NotApplicable("W2 only")

    def w2(self, ntasks: int, loops: int) -> int:
        self._taken.value = 0
        for connection in self._connections:
            connection.send((loops, ntasks))
        return sum(connection.recv() for connection in self._connections)

    def w3(self, ntasks: int, payload: bytes) -> int:
        raise NotApplicable("W2 only")

    def w4_startup(self) -> float:
        raise NotApplicable("W2 only")

    def w4_round_trip(self) -> int:
        raise NotApplicable("W2 only")


# ---------------------------------------------------------------------------- pyro backend

#: The group of the benchmark's own deployment (on its own name server, on an OS-picked port).
PYRO_GROUP = "bench"
#: Seconds a deployment command may take to say it is ready, and the workers to join.
PYRO_READY_TIMEOUT = 60.0
#: Seconds a deployment command may take to exit after SIGTERM before it is killed.
PYRO_STOP_TIMEOUT = 10.0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child, between fork and exec
    """Linux: have the kernel send SIGTERM to this child when the harness dies.

    So that a harness ended by ``--timeout`` (which exits at once, running no
    ``finally``) or killed leaves no deployment behind. Elsewhere, a no-op.
    """
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_PRCTL: Callable[..., int] | None = None


class _Command:
    """One ``python -m papyros ...`` command of a deployment, run as a user runs it.

    It runs in a session (process group) of its own, with the harness's
    working directory and environment; a thread reads its stdout line by line
    (so the pipe never fills), and its stderr (the logs) goes to a temporary
    file that error messages quote.
    """

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.name = args[0]
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115  (closed by wait_or_kill)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "papyros", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            text=True,
            start_new_session=True,
            preexec_fn=_die_with_parent if _PRCTL is not None else None,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, name=f"stdout of {self.name}", daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, pattern: str, deadline: float) -> re.Match[str]:
        """The first stdout line matching ``pattern``; raises if the command exits or is late."""
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(self._failure(f"printed no {pattern!r} in time")) from None
            if line is None:
                self.process.wait()
                raise RuntimeError(self._failure(f"exited with code {self.process.returncode}"))
            match = re.search(pattern, line)
            if match:
                return match

    def _failure(self, what: str) -> str:
        self._stderr.seek(0)
        log = self._stderr.read().decode(errors="replace").strip().splitlines()[-20:]
        return f"papyros {self.name} {what}; its last log lines:\n" + "\n".join(log)

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: each command stops like on Ctrl-C

    def wait_or_kill(self, deadline: float) -> None:
        try:
            self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            # Still running, so its process group is still its own: kill the whole group
            # (a workers command and the worker processes it started).
            _log(f"papyros {self.name} ignored SIGTERM: killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()
            self._stderr.close()


class PyroDeployment:
    """A distributed papyros on 127.0.0.1, started with its commands as a user starts it.

    ``python -m papyros nameserver --port 0`` (its port is read from the line
    it prints when ready), then ``dispatcher --group bench`` (waited for until
    it prints "ready at"), then ``workers -n N --group bench`` (until it prints
    "starting N workers"); the dispatcher and the workers find the name server
    with ``--ns-host 127.0.0.1 --ns-port PORT``. Every command inherits the
    harness's environment: ``PAPYROS_SECRET`` and a ``PYTHONPATH`` with
    ``benchmarks/`` on it, so that the worker processes import the task modules.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.ns_port = 0
        self._commands: list[_Command] = []

    def start(self) -> None:
        """Start the three commands; returns once the workers command is starting workers."""
        try:
            deadline = time.monotonic() + PYRO_READY_TIMEOUT
            env = dict(os.environ)
            nameserver = self._run(["nameserver", "--host", "127.0.0.1", "--port", "0"], env)
            ready = r"ready at PYRO:Pyro\.NameServer@127\.0\.0\.1:(\d+)"
            self.ns_port = int(nameserver.wait_for(ready, deadline).group(1))
            where = ["--group", PYRO_GROUP, "--ns-host", "127.0.0.1"]
            where += ["--ns-port", str(self.ns_port)]
            dispatcher = self._run(["dispatcher", *where], env)
            dispatcher.wait_for(r"ready at ", deadline)
            workers = self._run(["workers", "-n", str(self.workers), *where], env)
            workers.wait_for(rf"starting {self.workers} workers", deadline)
        except BaseException:
            self.stop()
            raise

    def _run(self, args: list[str], env: dict[str, str]) -> _Command:
        command = _Command(args, env)
        self._commands.append(command)
        return command

    def stop(self) -> None:
        """SIGTERM to every command (workers first), then SIGKILL to any still running."""
        commands, self._commands = self._commands[::-1], []
        for command in commands:
            command.terminate()
        deadline = time.monotonic() + PYRO_STOP_TIMEOUT
        for command in commands:
            command.wait_or_kill(deadline)


class PapyrosPyroRunner(PapyrosRunner):
    """papyros's Pyro backend: a real deployment on 127.0.0.1, and a client of it.

    The warm pool is a :class:`PyroDeployment` whose workers have all joined
    (``get_stats()["workers"]``), and the client
    ``papyros.get_dispatcher("pyro", group="bench", ns_host="127.0.0.1", ns_port=PORT)``.
    """

    label = "papyros pyro"
    backend = "pyro"
    notes: ClassVar[dict[str, str]] = {
        "W4": "papyros pyro (a): from starting the commands (name server, dispatcher, "
        "workers, each as its own process, in turn, each waited for until it says it is "
        "ready) to the first result, through get_dispatcher, make_queue, push and pop.",
    }

    def check(self) -> None:
        super().check()
        global _PRCTL
        _PRCTL = _load_prctl()
        # The deployment's shared secret: in the harness's environment, which every command,
        # and so every worker process, inherits. 32 characters, new for each run.
        os.environ["PAPYROS_SECRET"] = secrets.token_hex(16)

    def make_dispatcher(self) -> TaskDispatcher:
        import papyros

        return papyros.get_dispatcher(
            "pyro", group=PYRO_GROUP, ns_host="127.0.0.1", ns_port=self._deployment.ns_port
        )

    def start(self) -> None:
        self._deployment = PyroDeployment(self.settings.workers)
        self._deployment.start()
        try:
            super().start()
            deadline = time.monotonic() + PYRO_READY_TIMEOUT
            while len(self._dispatcher.get_stats()["workers"]) < self.settings.workers:  # type: ignore[attr-defined]
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.settings.workers} workers did not all join in time")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        try:
            dispatcher = getattr(self, "_dispatcher", None)
            if dispatcher is not None:
                dispatcher.close()
        finally:
            self._deployment.stop()

    def w4_startup(self) -> float:
        start = time.perf_counter()
        deployment = PyroDeployment(self.settings.workers)
        try:
            deployment.start()
            import papyros

            dispatcher = papyros.get_dispatcher(
                "pyro", group=PYRO_GROUP, ns_host="127.0.0.1", ns_port=deployment.ns_port
            )
            try:
                queue = dispatcher.make_queue()
                queue.push(self._noop(1))
                queue.pop()
                return time.perf_counter() - start
            finally:
                dispatcher.close()
        finally:
            deployment.stop()


class MapVariant(PapyrosRunner):
    """papyros's ``dispatcher.map`` on W1: arguments in, no Task object made per item.

    A second papyros row of its backend, with a pool of its own; it runs W1
    only (``map(noop, range(N), chunksize=c)``), and gets a W1 table of its
    own, against the same peer measurements.
    """

    variant = "map"
    #: How the variant runs W1, for its table.
    call = "dispatcher.map(noop, range(N), chunksize=c)"
    notes: ClassVar[dict[str, str]] = {}
    runs: ClassVar[frozenset[str] | None] = frozenset({"W1"})

    def w1(self, ntasks: int, chunksize: int) -> int:
        return sum(self._dispatcher.map(self._noop, range(ntasks), chunksize=chunksize))

    def w2(self, ntasks: int, loops: int) -> int:
        raise NotApplicable("W1 only")

    def w3(self, ntasks: int, payload: bytes) -> int:
        raise NotApplicable("W1 only")

    def w4_startup(self) -> float:
        raise NotApplicable("W1 only")

    def w4_round_trip(self) -> int:
        raise NotApplicable("W1 only")


class PapyrosThreadMapRunner(MapVariant, PapyrosThreadRunner):
    label = "papyros thread, map"


class PapyrosProcessMapRunner(MapVariant, PapyrosProcessRunner):
    label = "papyros process, map"


class PapyrosPyroMapRunner(MapVariant, PapyrosPyroRunner):
    label = "papyros pyro, map"


class DaskDistributedRunner(Runner):
    """Dask distributed: ``Client(LocalCluster(...))``, 2 worker processes of 1 thread.

    Everything listens on 127.0.0.1, with no dashboard. Tasks are submitted
    with ``client.map(f, items, pure=False)`` (``pure=False``: every task is
    run, none is taken from a cache of earlier results) and gathered with
    ``as_completed(futures, with_results=True)``.
    """

    label = "Dask distributed"
    notes: ClassVar[dict[str, str]] = {
        "W1": "Dask distributed has no chunksize: at chunksize 1 it runs client.map(noop, "
        "range(N)) (one Dask task per item, submitted in one batch); at chunksize c, "
        "client.map(noop_chunk, chunks), where each Dask task runs noop on a list of c "
        "items and returns the list of their results.",
        "W4": "Dask distributed: (a) Client(LocalCluster(...)) to the result of "
        "client.submit(noop, 1); (b) client.submit(noop, 1, pure=False).result().",
    }

    def check(self) -> None:
        try:
            import distributed  # noqa: F401
        except ImportError as exc:
            raise Unavailable("Dask distributed is not installed: pip install distributed") from exc

    def make_client(self) -> Any:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(
            n_workers=self.settings.workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,  # no dashboard
            # The scheduler serves a few HTTP routes (health, metrics) even without a dashboard:
            # on 127.0.0.1 and an OS-picked port, rather than 8787 (":0" would mean 0.0.0.0).
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        )
        try:
            return Client(cluster)
        except BaseException:
            cluster.close()
            raise

    @staticmethod
    def close_client(client: Any) -> None:
        cluster = client.cluster
        try:
            client.close()
        finally:
            cluster.close()

    def start(self) -> None:
        self._client = self.make_client()

    def stop(self) -> None:
        self.close_client(self._client)

    def _results(self, function: Callable[..., Any], items: list[Any]) -> Iterable[Any]:
        from distributed import as_completed

        futures = self._client.map(function, items, pure=False)
        try:
            for _, result in as_completed(futures, with_results=True):
                yield result
        finally:
            self._client.cancel(futures)  # Nothing left on the cluster for the next run.

    def w1(self, ntasks: int, chunksize: int) -> int:
        if chunksize == 1:
            return sum(self._results(workloads.noop, list(range(ntasks))))
        chunks = [list(range(i, min(i + chunksize, ntasks))) for i in range(0, ntasks, chunksize)]
        return sum(itertools.chain.from_iterable(self._results(workloads.noop_chunk, chunks)))

    def w2(self, ntasks: int, loops: int) -> int:
        return sum(self._results(workloads.spin, [loops] * ntasks))

    def w3(self, ntasks: int, payload: bytes) -> int:
        return sum(map(len, self._results(workloads.echo, [payload] * ntasks)))

    def w4_startup(self) -> float:
        start = time.perf_counter()
        client = self.make_client()
        try:
            client.submit(workloads.noop, 1, pure=False).result()
            return time.perf_counter() - start
        finally:
            self.close_client(client)

    def w4_round_trip(self) -> int:
        return self._client.submit(workloads.noop, 1, pure=False).result()  # type: ignore[no-any-return]


#: W1 on Parallel Python: the most jobs submitted and not yet done.
PP_WINDOW = 1_000


class ParallelPythonRunner(Runner):
    """Parallel Python: ``pp.Server(ncpus=2, ppservers=())``, local worker processes only.

    With no ``ppservers`` it opens no socket: its workers are subprocesses
    that it talks to over pipes. One ``job_server.submit(f, (x,))`` per task;
    ``job()`` waits for a job's result.
    """

    label = "Parallel Python"
    notes: ClassVar[dict[str, str]] = {
        "W1": "Parallel Python has no chunksize: at chunksize 1 it submits one job per item; "
        "at chunksize c, one job per c items, each running noop_chunk (noop on each item, "
        f"the list of results returned); at most {PP_WINDOW:,} jobs are outstanding at once.",
        "W4": "Parallel Python: (a) pp.Server(...) to the result of one job; "
        "(b) job_server.submit(noop, (1,))().",
    }

    def check(self) -> None:
        try:
            import pp  # type: ignore[import-untyped]
        except ImportError as exc:
            raise Unavailable("Parallel Python is not installed: pip install pp") from exc
        if not hasattr(pp, "Server"):
            raise Unavailable(f"the module pp at {pp.__file__} is not Parallel Python")

    def make_server(self) -> Any:
        import pp

        # pp.Server adds its working directory and sys.path to $PYTHONPATH, for its workers,
        # which it starts at once; other runners' processes should not inherit that.
        python_path = os.environ.get("PYTHONPATH")
        try:
            return pp.Server(ncpus=self.settings.workers, ppservers=())
        finally:
            if python_path is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = python_path

    def start(self) -> None:
        self._server = self.make_server()

    def stop(self) -> None:
        self._server.destroy()

    def w1(self, ntasks: int, chunksize: int) -> int:
        submit = self._server.submit
        if chunksize == 1:
            noop = workloads.noop
            return sum(self._windowed(submit(noop, (i,)) for i in range(ntasks)))
        noop_chunk, depends = workloads.noop_chunk, (workloads.noop,)
        jobs = (
            submit(noop_chunk, (list(range(i, min(i + chunksize, ntasks))),), depends)
            for i in range(0, ntasks, chunksize)
        )
        return sum(itertools.chain.from_iterable(self._windowed(jobs)))

    @staticmethod
    def _windowed(jobs: Iterable[Any]) -> Iterable[Any]:
        """The jobs' results, in order, with at most PP_WINDOW jobs submitted and not yet done.

        Submitting all 100,000 jobs of W1 first makes pp superlinear (a run had not
        finished submitting after 4 minutes); a window keeps it at its usual rate,
        as papyros's ``execute`` keeps a window of work in flight.
        """
        window: collections.deque[Any] = collections.deque()
        for job in jobs:
            window.append(job)
            if len(window) >= PP_WINDOW:
                yield window.popleft()()
        while window:
            yield window.popleft()()

    def w2(self, ntasks: int, loops: int) -> int:
        jobs = [self._server.submit(workloads.spin, (loops,)) for _ in range(ntasks)]
        return sum(job() for job in jobs)

    def w3(self, ntasks: int, payload: bytes) -> int:
        jobs = [self._server.submit(workloads.echo, (payload,)) for _ in range(ntasks)]
        return sum(len(job()) for job in jobs)

    def w4_startup(self) -> float:
        start = time.perf_counter()
        server = self.make_server()
        try:
            server.submit(workloads.noop, (1,))()
            return time.perf_counter() - start
        finally:
            server.destroy()

    def w4_round_trip(self) -> int:
        return self._server.submit(workloads.noop, (1,))()  # type: ignore[no-any-return]


#: The backends, each with its runners: papyros's first, then its peers.
BACKENDS: dict[str, tuple[type[Runner], ...]] = {
    "thread": (PapyrosThreadRunner, ThreadPoolRunner, SerialRunner, PapyrosThreadMapRunner),
    "process": (
        PapyrosProcessRunner,
        MultiprocessingPoolRunner,
        ProcessPoolRunner,
        LokyRunner,
        BareProcessesRunner,
        PapyrosProcessMapRunner,
    ),
    "pyro": (
        PapyrosPyroRunner,
        DaskDistributedRunner,
        ParallelPythonRunner,
        BareProcessesRunner,
        PapyrosPyroMapRunner,
    ),
}

# ---------------------------------------------------------------------------- workloads

#: W2: one task's CPU time is taken this many times; the best, times the task count, is
#: the serial time of all the tasks.
SPIN_SAMPLES = 30
#: W4b samples round trips in blocks of this many, one block per round.
ROUND_TRIPS_PER_ROUND = 200


@dataclass(frozen=True)
class Measured:
    """A measured number, and optionally more to show beside it in its cell."""

    value: float
    detail: str = ""


@dataclass(frozen=True)
class Metric:
    """One column of a workload's table: how to sample it, and how samples make its number.

    A metric is sampled in rounds, and each round samples every runner of a
    backend in turn, so that the runners share whatever the machine's load
    does meanwhile (other programs, CPU frequency, where the OS puts threads).
    """

    heading: str
    higher_is_better: bool
    format: Callable[[float], str]
    rounds: int
    #: One round on one runner: durations in seconds (one or more).
    sample: Callable[[Runner], list[float]]
    #: All of one runner's durations: its number in the table.
    summarize: Callable[[list[float]], Measured]
    #: Sample each runner with no other pool of its backend up. An idle pool still
    #: uses CPU (a Dask LocalCluster ~10% of a core), which a measure of the whole
    #: machine's use, like W2's efficiency, would charge to whoever is measured.
    alone: bool = False


@dataclass(frozen=True)
class Workload:
    """One table: what it measures (in words, for the reader) and its columns."""

    name: str
    title: str
    describe: Callable[[Settings], list[str]]  # lines printed under the title
    metrics: Callable[[Settings], list[Metric]]


class WrongResult(Exception):
    """A runner returned the wrong results: it lost, repeated or corrupted tasks."""


def timed(run: Callable[[], Any], expected: Any) -> float:
    """Seconds that ``run()`` takes; raises :class:`WrongResult` unless it returns ``expected``."""
    start = time.perf_counter()
    got = run()
    elapsed = time.perf_counter() - start
    if got != expected:
        raise WrongResult(f"expected {expected!r}, got {got!r}")
    return elapsed


def w1_metrics(s: Settings) -> list[Metric]:
    return [_w1_metric(s, chunksize) for chunksize in s.sizes.w1_chunksizes]


def _w1_metric(s: Settings, chunksize: int) -> Metric:
    ntasks = s.sizes.w1_tasks

    def sample(runner: Runner) -> list[float]:
        return [timed(lambda: runner.w1(ntasks, chunksize), ntasks * (ntasks - 1) // 2)]

    def summarize(samples: list[float]) -> Measured:
        return Measured(ntasks / min(samples))

    return Metric(f"chunksize {chunksize:,} (tasks/s)", True, _rate, s.repeat, sample, summarize)


def w2_metrics(s: Settings) -> list[Metric]:
    ntasks, loops = s.sizes.w2_tasks, s.spin_loops

    def sample(runner: Runner) -> list[float]:
        return [timed(lambda: runner.w2(ntasks, loops), ntasks * s.spin_result)]

    def summarize(samples: list[float]) -> Measured:
        wall = min(samples)
        ideal = s.spin_serial_seconds / s.workers
        return Measured(100 * ideal / wall, f"{wall:.2f} s")

    return [
        Metric(
            "efficiency (wall)",
            True,
            lambda v: f"{v:.1f}%",
            s.repeat,
            sample,
            summarize,
            alone=True,
        )
    ]


def w3_metrics(s: Settings) -> list[Metric]:
    ntasks, size = s.sizes.w3_tasks, s.sizes.w3_payload_bytes

    def sample(runner: Runner) -> list[float]:
        payload = os.urandom(size)
        return [timed(lambda: runner.w3(ntasks, payload), ntasks * size)]

    def summarize(samples: list[float]) -> Measured:
        # Each task's payload goes to a worker and comes back: 2 * size bytes per task.
        return Measured(2 * ntasks * size / 1e6 / min(samples))

    return [Metric("MB/s (in + out)", True, _rate, s.repeat, sample, summarize)]


def w4_metrics(s: Settings) -> list[Metric]:
    block = min(ROUND_TRIPS_PER_ROUND, s.sizes.w4_round_trips)

    def sample_startup(runner: Runner) -> list[float]:
        return [runner.w4_startup()]

    def sample_round_trips(runner: Runner) -> list[float]:
        return [timed(runner.w4_round_trip, 1) for _ in range(block)]

    return [
        Metric(
            "(a) start-up (ms)",
            False,
            lambda v: f"{v:,.1f}",
            s.sizes.w4_startups,
            sample_startup,
            lambda samples: Measured(1e3 * statistics.median(samples)),
        ),
        Metric(
            "(b) round trip (µs)",
            False,
            lambda v: f"{v:,.1f}",
            max(1, s.sizes.w4_round_trips // block),
            sample_round_trips,
            lambda samples: Measured(1e6 * statistics.median(samples)),
        ),
    ]


def _rate(value: float) -> str:
    return f"{value:,.0f}"


WORKLOADS: dict[str, Workload] = {
    "W1": Workload(
        "W1",
        "no-op tasks: throughput",
        lambda s: [
            f"{s.sizes.w1_tasks:,} tasks that return their argument, all results consumed; "
            f"tasks/s, best of {s.repeat}.",
            "papyros: dispatcher.execute(tasks, chunksize=c); peers: map / imap_unordered "
            "with the same chunksize.",
        ],
        w1_metrics,
    ),
    "W2": Workload(
        "W2",
        "pure-Python CPU tasks: parallel efficiency",
        lambda s: [
            f"{s.sizes.w2_tasks} tasks of {1e3 * s.spin_task_seconds:.1f} ms each "
            f"(spin({s.spin_loops:,}), calibrated), {s.workers} workers, chunksize 1; "
            f"best of {s.repeat}.",
            f"efficiency = (serial time {s.spin_serial_seconds:.2f} s / {s.workers} workers) "
            "/ wall time; 100% is perfect; the wall time is in brackets.",
            f"The serial time is {s.sizes.w2_tasks} x the best CPU time of one task "
            f"(best of {SPIN_SAMPLES}, time.thread_time).",
        ],
        w2_metrics,
    ),
    "W3": Workload(
        "W3",
        "1 MB payloads: data throughput",
        lambda s: [
            f"{s.sizes.w3_tasks} tasks, each taking and returning the same "
            f"{s.sizes.w3_payload_bytes / 1e6:g} MB bytes object; best of {s.repeat}.",
            "MB/s counts the bytes in plus the bytes out (2 MB per task), 1 MB = 10**6 bytes.",
        ],
        w3_metrics,
    ),
    "W4": Workload(
        "W4",
        "latency",
        lambda s: [
            f"(a) building a fresh pool and getting the result of one no-op task: median of "
            f"{s.sizes.w4_startups}; shutdown untimed.",
            f"(b) on a warm pool, one task sent and its result awaited, median of "
            f"{s.sizes.w4_round_trips:,}: papyros queue.push + queue.pop; executors "
            "submit().result(); Pool.apply().",
        ],
        w4_metrics,
    ),
}

# ---------------------------------------------------------------------------- running


@dataclass
class Row:
    """What one runner measured: per (workload, metric heading), a number or why there is none."""

    backend: str
    runner: type[Runner]
    cells: dict[tuple[str, str], Measured | str] = field(default_factory=dict)


def calibrate(settings: Settings) -> None:
    """Find the W2 loop count for the target task time, and the serial time of all W2 tasks.

    Both are CPU times (``time.thread_time``), not wall times: on a machine
    that other programs share, a wall-clock calibration drifts with their load,
    and a serial time taken at another moment than the parallel runs could
    even make an efficiency exceed 100%. The serial time is the task count
    times the best CPU time of one task.
    """
    target = settings.sizes.w2_task_seconds
    loops = 10_000
    while (elapsed := _cpu_time_of_spin(loops, 3)) < target / 10:  # too short to time well
        loops *= 4
    for _ in range(2):  # scale to the target, then once more from closer by
        loops = max(1, round(loops * target / elapsed))
        elapsed = _cpu_time_of_spin(loops, SPIN_SAMPLES)
    settings.spin_loops, settings.spin_task_seconds = loops, elapsed
    settings.spin_result = workloads.spin(loops)
    settings.spin_serial_seconds = settings.sizes.w2_tasks * settings.spin_task_seconds


def _cpu_time_of_spin(loops: int, repeat: int) -> float:
    """The best CPU time of one ``spin(loops)`` in this thread."""
    best = math.inf
    for _ in range(repeat):
        start = time.thread_time()
        workloads.spin(loops)
        best = min(best, time.thread_time() - start)
    return best


def _load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):  # Not on Unix.
        return "unknown"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def available_runners(backend: str, settings: Settings, skipped: list[str]) -> list[Runner]:
    """The runners of ``backend`` that can run here; the others are added to ``skipped``.

    Without its papyros runner a backend is skipped whole: there is nothing to compare with.
    """
    runners = []
    for runner_class in BACKENDS[backend]:
        runner = runner_class(settings)
        try:
            runner.check()
        except Unavailable as exc:
            if runner.is_papyros:
                skipped.append(f"backend {backend!r}: {runner.label}: {exc}")
                _log(f"skipping {skipped[-1]}")
                return []
            skipped.append(f"{runner.label} ({backend}): {exc}")
            _log(f"skipping {skipped[-1]}")
            continue
        runners.append(runner)
    return runners


def run_backend(
    backend: str,
    runners: Sequence[Runner],
    workloads_: Sequence[Workload],
    settings: Settings,
    timeout: float,
) -> list[Row]:
    """Measure every metric of ``workloads_`` on every runner of one backend.

    The runners' warm pools are all up together, and each metric is sampled
    in rounds that take every runner in turn (see :class:`Metric`). Then the
    pools go down, and the metrics sampled ``alone`` go round the runners the
    same way, each runner's pool up only while it is sampled. A failure is
    logged and leaves "failed" in the cells it spoils; the run goes on. A
    sample still running after ``timeout`` seconds ends the program, with
    every thread's stack on stderr, rather than hanging forever.
    """
    metrics = [
        (workload.name, metric) for workload in workloads_ for metric in workload.metrics(settings)
    ]
    rows = [Row(backend, type(runner)) for runner in runners]
    for runner, row in zip(runners, rows, strict=True):
        for name, metric in metrics:
            if runner.runs is not None and name not in runner.runs:
                row.cells[(name, metric.heading)] = "n/a"
    together = [(name, metric) for name, metric in metrics if not metric.alone]
    alone = [(name, metric) for name, metric in metrics if metric.alone]
    started: list[tuple[Runner, Row]] = []
    try:
        for runner, row in zip(runners, rows, strict=True):
            if not _wanted(row, together):
                continue
            if _start(runner, settings, timeout, f"[{backend}] {runner.label}"):
                started.append((runner, row))
            else:
                row.cells.update({(name, metric.heading): "failed" for name, metric in together})
        for name, metric in together:
            _measure(backend, name, metric, started, timeout)
    finally:
        _stop_all(backend, started)
    for name, metric in alone:
        _measure_alone(
            backend, name, metric, list(zip(runners, rows, strict=True)), settings, timeout
        )
    return rows


def _wanted(row: Row, metrics: Sequence[tuple[str, Metric]]) -> bool:
    """Whether any of ``metrics`` is still to be sampled on ``row``'s runner."""
    return any((name, metric.heading) not in row.cells for name, metric in metrics)


def _stop_all(backend: str, started: Sequence[tuple[Runner, Row]]) -> None:
    for runner, _ in started:
        try:
            runner.stop()
        except Exception:
            _log(f"[{backend}] {runner.label}: could not stop:\n{traceback.format_exc()}")


def _start(runner: Runner, settings: Settings, timeout: float, label: str) -> bool:
    """Start a runner's warm pool and warm it up; False (and logged) if that failed."""
    try:
        runner.start()
    except Exception:
        _log(f"{label}: could not start:\n{traceback.format_exc()}")
        return False
    faulthandler.dump_traceback_later(timeout, exit=True)
    try:
        runner.warm_up()
    except Exception:
        _log(f"{label}: failed to warm up:\n{traceback.format_exc()}")
        runner.stop()
        return False
    finally:
        faulthandler.cancel_dump_traceback_later()
    return True


def _measure(
    backend: str,
    workload: str,
    metric: Metric,
    runners: Sequence[tuple[Runner, Row]],
    timeout: float,
) -> None:
    """Sample one metric on every runner, round by round, and fill in their cells."""
    started = time.perf_counter()
    samples: list[list[float]] = [[] for _ in runners]
    for _ in range(metric.rounds):
        for (runner, row), runner_samples in zip(runners, samples, strict=True):
            _sample(backend, workload, metric, runner, row, runner_samples, timeout)
    _summarize(backend, workload, metric, runners, samples, started)


def _measure_alone(
    backend: str,
    workload: str,
    metric: Metric,
    runners: Sequence[tuple[Runner, Row]],
    settings: Settings,
    timeout: float,
) -> None:
    """As :func:`_measure`, with only the sampled runner's pool up, started for each sample."""
    key = (workload, metric.heading)
    started = time.perf_counter()
    samples: list[list[float]] = [[] for _ in runners]
    for _ in range(metric.rounds):
        for (runner, row), runner_samples in zip(runners, samples, strict=True):
            if key in row.cells:
                continue
            if not _start(runner, settings, timeout, f"[{backend}] {runner.label}"):
                row.cells[key] = "failed"
                continue
            try:
                _sample(backend, workload, metric, runner, row, runner_samples, timeout)
            finally:
                _stop_all(backend, [(runner, row)])
    _summarize(backend, workload, metric, runners, samples, started)


def _sample(
    backend: str,
    workload: str,
    metric: Metric,
    runner: Runner,
    row: Row,
    samples: list[float],
    timeout: float,
) -> None:
    """Add one round's samples of ``metric`` on ``runner``; a failure fills its cell instead."""
    key = (workload, metric.heading)
    if key in row.cells:
        return  # not applicable, or failed: no more rounds
    faulthandler.dump_traceback_later(timeout, exit=True)
    try:
        samples += metric.sample(runner)
    except NotApplicable:
        row.cells[key] = "n/a"
    except Exception:
        label = f"[{backend}] {runner.label}: {workload} {metric.heading}"
        _log(f"{label} failed:\n{traceback.format_exc()}")
        row.cells[key] = "failed"
    finally:
        faulthandler.cancel_dump_traceback_later()


def _summarize(
    backend: str,
    workload: str,
    metric: Metric,
    runners: Sequence[tuple[Runner, Row]],
    samples: list[list[float]],
    started: float,
) -> None:
    """Fill in each runner's cell from its samples, and log the metric's line."""
    key = (workload, metric.heading)
    summary = []
    for (runner, row), runner_samples in zip(runners, samples, strict=True):
        if key not in row.cells:
            row.cells[key] = metric.summarize(runner_samples)
        summary.append(f"{runner.label} {_cell(metric, row.cells[key])}")
    elapsed = time.perf_counter() - started
    _log(f"[{backend}] {workload} {metric.heading}: {', '.join(summary)}  ({elapsed:.1f} s)")


# ---------------------------------------------------------------------------- tables


@dataclass
class Table:
    title: str
    lines: list[str]
    headings: list[str]
    rows: list[list[str]]
    notes: list[str]


def _ratio(papyros: Measured | str | None, peer: Measured | str | None) -> str:
    if isinstance(papyros, Measured) and isinstance(peer, Measured) and peer.value:
        return f"{papyros.value / peer.value:.2f}"
    return "—"


def _cell(metric: Metric, cell: Measured | str | None) -> str:
    if cell is None:
        return "—"
    if isinstance(cell, str):
        return cell
    text = metric.format(cell.value)
    return f"{text} ({cell.detail})" if cell.detail else text


def _legend(metrics: Sequence[Metric]) -> list[str]:
    """Which way each ratio is better, in one line when every column agrees."""
    meaning = {True: "above 1, papyros is better", False: "below 1, papyros is faster"}
    directions = {metric.higher_is_better for metric in metrics}
    if len(directions) == 1:
        return [f"papyros/peer = papyros's number / the peer's: {meaning[directions.pop()]}."]
    return [
        f"papyros/peer of {metric.heading}: {meaning[metric.higher_is_better]}."
        for metric in metrics
    ]


def build_tables(workload: Workload, rows: Sequence[Row], settings: Settings) -> list[Table]:
    """The workload's table, then one per papyros variant that measured it (e.g. ``map``).

    A variant's table compares it with the same peer measurements as the main one.
    """
    variants = [row for row in rows if getattr(row.runner, "variant", "")]
    main = [row for row in rows if not getattr(row.runner, "variant", "")]
    tables = [build_table(workload, main, settings)]
    for variant in variants:
        cells = [value for (name, _), value in variant.cells.items() if name == workload.name]
        if all(value == "n/a" for value in cells):
            continue
        peers = [
            row for row in main if row.backend == variant.backend and not row.runner.is_papyros
        ]
        table = build_table(workload, [variant, *peers], settings)
        table.title += f", papyros {variant.runner.variant}"  # type: ignore[attr-defined]
        table.lines = [
            line.replace("dispatcher.execute(tasks, chunksize=c)", variant.runner.call)  # type: ignore[attr-defined]
            for line in table.lines
        ]
        tables.append(table)
    return tables


def build_table(workload: Workload, rows: Sequence[Row], settings: Settings) -> Table:
    """One table: a row per runner, a column per metric, each followed by papyros / peer."""
    metrics = workload.metrics(settings)
    headings = ["backend", "runner"]
    for metric in metrics:
        headings += [metric.heading, "papyros/peer"]
    # A runner that does not run the workload at all (it declares which it runs) has no row.
    rows = [row for row in rows if row.runner.runs is None or workload.name in row.runner.runs]
    papyros_rows = {row.backend: row for row in rows if row.runner.is_papyros}
    body = []
    for row in rows:
        reference = papyros_rows.get(row.backend)
        cells = [row.backend, row.runner.label]
        for metric in metrics:
            key = (workload.name, metric.heading)
            cells.append(_cell(metric, row.cells.get(key)))
            if row.runner.is_papyros or reference is None:
                cells.append("")
            else:
                cells.append(_ratio(reference.cells.get(key), row.cells.get(key)))
        body.append(cells)
    notes = [row.runner.notes[workload.name] for row in rows if workload.name in row.runner.notes]
    return Table(
        f"{workload.name}: {workload.title}",
        [*workload.describe(settings), *_legend(metrics)],
        headings,
        body,
        notes,
    )


def render_text(table: Table) -> str:
    widths = [
        max(len(heading), *(len(row[i]) for row in table.rows))
        for i, heading in enumerate(table.headings)
    ]

    def line(cells: Sequence[str]) -> str:
        # Names to the left, numbers to the right.
        parts = [
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    out = [table.title, *(f"  {text}" for text in table.lines), ""]
    out.append(line(table.headings))
    out.append(line(["-" * width for width in widths]))
    out.extend(line(row) for row in table.rows)
    out.extend(f"  * {note}" for note in table.notes)
    return "\n".join(out)


def render_markdown(table: Table) -> str:
    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    out = [f"### {table.title}", "", *(f"{text}  " for text in table.lines), ""]
    out.append(line(table.headings))
    out.append(line(":--" if i < 2 else "--:" for i in range(len(table.headings))))
    out.extend(line(row) for row in table.rows)
    if table.notes:
        out.append("")
        out.extend(f"- {note}" for note in table.notes)
    return "\n".join(out)


def _papyros_revision() -> str:
    """The git commit of the papyros measured, and whether its files had uncommitted changes."""
    import papyros

    package = Path(papyros.__file__).parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(package), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "-C", str(package), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    return f"commit {commit}" + (" + uncommitted changes" if changes else "")


def environment(settings: Settings) -> list[tuple[str, str]]:
    """What the numbers depend on: the machine, the versions, the settings."""
    import papyros

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # Not on Linux.
        cpus = os.cpu_count() or 0
    versions = [
        f"papyros {papyros.__version__} ({Path(papyros.__file__).parent}, {_papyros_revision()})"
    ]
    # The peer libraries, and Pyro5 (which the pyro backend runs on), from their metadata.
    for distribution in ("loky", "Pyro5", "dask", "distributed", "pp"):
        try:
            versions.append(f"{distribution} {importlib.metadata.version(distribution)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{distribution} not installed")
    return [
        ("date", datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")),
        ("python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("platform", platform.platform()),
        ("CPUs", f"{os.cpu_count()} ({cpus} usable by this process)"),
        ("libraries", ", ".join(versions)),
        (
            "settings",
            f"{settings.workers} workers, start method {settings.start_method!r}, "
            f"best of {settings.repeat} for throughput",
        ),
    ]


# ---------------------------------------------------------------------------- command line


def _names(text: str, known: Iterable[str], what: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown) or repr(text)}; choose from {', '.join(known)}"
        )
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time papyros against ThreadPoolExecutor, multiprocessing, "
        "ProcessPoolExecutor, loky, Dask distributed and Parallel Python on this machine, "
        "and print ratios papyros / peer.",
    )
    parser.add_argument(
        "--backends",
        type=lambda text: _names(text, BACKENDS, "backend"),
        default=list(BACKENDS),
        help=f"comma-separated, from {', '.join(BACKENDS)} (default: all)",
    )
    parser.add_argument(
        "--workloads",
        type=lambda text: _names(text.upper(), WORKLOADS, "workload"),
        default=list(WORKLOADS),
        help=f"comma-separated, from {', '.join(WORKLOADS)} (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="about a tenth of the work")
    parser.add_argument(
        "--chunksizes",
        type=lambda text: tuple(int(part) for part in text.split(",")),
        default=Sizes.w1_chunksizes,
        help="W1's chunksizes, comma-separated (default: 1,1000)",
    )
    parser.add_argument(
        "--start-method",
        choices=multiprocessing.get_all_start_methods(),
        default="spawn",
        help="how every process pool starts its workers (default: spawn)",
    )
    parser.add_argument("--workers", type=int, default=2, help="workers per pool (default: 2)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="runs of each throughput measurement, the best is reported (default: 2)",
    )
    parser.add_argument(
        "--markdown", type=Path, metavar="PATH", help="also write the tables to PATH as markdown"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds one measurement may take before the run is aborted (default: 600)",
    )
    args = parser.parse_args(argv)
    if args.workers < 1 or args.repeat < 1:
        parser.error("--workers and --repeat must be at least 1")
    if not args.chunksizes or min(args.chunksizes) < 1:
        parser.error("--chunksizes must be whole numbers of at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = replace(Sizes().quick() if args.quick else Sizes(), w1_chunksizes=args.chunksizes)
    settings = Settings(args.workers, args.start_method, args.repeat, sizes)
    selected = [WORKLOADS[name] for name in args.workloads]
    started = time.perf_counter()
    load_at_start = _load_average()

    skipped: list[str] = []  # what cannot run here, and why
    plan = [(backend, available_runners(backend, settings, skipped)) for backend in args.backends]
    plan = [(backend, runners) for backend, runners in plan if runners]
    if plan and "W2" in args.workloads:
        _log("calibrating W2 ...")
        calibrate(settings)
    rows = [
        row
        for backend, runners in plan
        for row in run_backend(backend, runners, selected, settings, args.timeout)
    ]

    header = environment(settings)
    header.append(("total time", f"{time.perf_counter() - started:.0f} s"))
    # Other programs share the CPUs: the numbers are only as quiet as the machine was.
    header.append(
        ("load", f"1-minute load average {load_at_start} at start, {_load_average()} at end")
    )
    tables = [table for workload in selected for table in build_tables(workload, rows, settings)]
    print("\n".join(f"{key:>10}: {value}" for key, value in header))
    for note in skipped:
        print(f"   skipped: {note}")
    if not rows:
        print("\nnothing was measured: no backend selected can run here")
        return 1
    for table in tables:
        print()
        print(render_text(table))

    if args.markdown:
        parts = ["\n".join(f"- {key}: {value}" for key, value in header)]
        parts.extend(f"- skipped: {note}" for note in skipped)
        parts.extend("\n" + render_markdown(table) for table in tables)
        args.markdown.write_text("\n".join(parts) + "\n", encoding="utf-8")
        _log(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
