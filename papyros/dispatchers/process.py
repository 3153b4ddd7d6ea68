"""The process backend: workers are processes on this machine, fed by the core in this one.

::

    client thread(s)         Scheduler             feeder thread k      worker process k
    ────────────────         ─────────             ───────────────      ────────────────
                                                                        (_process_worker)
    push / execute:                                                     work() loop:
      pickle unit once ──▶ pending FIFOs ──assign─▶ batch of units ──pipe──▶ unpickle unit,
                                                    (while worker k                run tasks,
                                                     has room: small               pickle outcomes
                                                     prefetch)                     once
                                                                                     │
    pop / next():                                  reader thread (one)               │
      unpickle outcomes ◀─ finished buffers ◀─complete─ wait() on every ◀──pipe─────┘
                                                     result pipe and every
                                                     process sentinel; a dead
                                                     worker: worker_lost() and
                                                     a replacement; a task over
                                                     its time limit: kill

This module is the dispatcher side: the worker table, the feeders and the
reader. What runs in a worker process is in
:mod:`papyros.dispatchers._process_worker`; how messages are framed on the
pipes, in :mod:`papyros.dispatchers._pipes`.

Bytes only cross the pipes: each unit is pickled once in the client and once
(its outcomes) in the worker; the core, the feeders and the reader move
opaque payloads (see :mod:`papyros.serialization`). Workers pull: a feeder
sends its worker more units only while the worker holds fewer than its
prefetch, sized from the worker's measured speed to about
``_PREFETCH_SECONDS`` of work, so the pipe of a worker running short units is
never empty and a worker running long ones holds only one. No worker holds
more than its share of the work (see ``Scheduler.assign``), and one whose
batch turns out slower than the units it was sized from hands back the units
it has not started (see ``_process_worker``). Many
units travel per pipe write and many outcomes per read, so there is no
per-task round trip.

Faults: the reader learns of a worker's death from its sentinel (or EOF on its
pipe), hands its units back to the core (which re-dispatches them, or past
``max_attempts`` makes a ``WorkerLostError`` their outcome) and starts a
replacement. A task over its ``time_limit`` is killed with its worker; its
outcome is a ``TimeoutError``. Workers ignore SIGINT: Ctrl-C belongs to the
client, which cancels its work and, on ``close()``, stops the workers.
"""

from __future__ import annotations

import atexit
import enum
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import multiprocessing.util  # Its exit hook must be registered before ours (see _OPEN).
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from papyros._deadline import check_size
from papyros.config import Config
from papyros.dispatcher import QueueLink
from papyros.dispatchers._local import CoreDispatcher, CoreQueueLink, resolve_workers
from papyros.dispatchers._pipes import (
    ReadyWaiter,
    enlarge_pipe,
    pipe_bytes,
    recv_framed,
    send_framed,
)
from papyros.dispatchers._process_worker import worker_main
from papyros.errors import (
    ClosedTaskDispatcherError,
    ConfigurationError,
    PapyrosError,
    TimeoutError,
)
from papyros.scheduler import Scheduler
from papyros.serialization import PickleCodec
from papyros.task import Encoded, Outcome, Results

__all__ = ["MultiProcessTaskDispatcher"]

logger = logging.getLogger(__name__)

#: The start method used unless one is chosen: a fresh interpreter per worker,
#: safe from a parent that already runs threads (ours always does), on every OS.
DEFAULT_START_METHOD = "spawn"

# How much work, in seconds, a worker is given ahead of what it has finished.
_PREFETCH_SECONDS = 0.005
# The fewest and most units a worker holds at once (running, waiting in its pipe). A
# worker holds at least two (the one it runs, and the next, so that it never waits a
# round trip between units), and more once its units prove short. Units that wait in
# a worker's pipe count as assigned, not as pending within the dispatcher's ``size``.
_MIN_INFLIGHT = 2
_MAX_INFLIGHT = 256
# A worker whose units take longer than this, or whose speed is not known yet, holds
# one at a time: a round trip between units (well under a millisecond) costs little
# next to them, and a second long unit in its pipe could wait there for it while
# another worker sits idle.
_ALONE_SECONDS = 0.05
# close(): how long running tasks get to finish, then how long SIGTERM gets before SIGKILL.
_CLOSE_GRACE = 0.5
_TERMINATE_GRACE = 2.0
# How long a worker that closed its pipe may take to exit before it is killed.
_EXIT_GRACE = 5.0
# Workers that die before saying they are ready, in a row, before the dispatcher gives up.
_MAX_FAILED_STARTS = 3


class _State(enum.Enum):
    RUNNING = "running"  # takes units
    RETIRING = "retiring"  # ran max_tasks_per_child tasks: finishes what it holds, then exits
    DEAD = "dead"  # exited; what it held went back to the core


class _Timer:
    """A task of a worker running under a time limit."""

    __slots__ = ("attempt", "deadline", "limit", "ntasks", "unit_id", "what")

    def __init__(self, unit_id: int, attempt: int, ntasks: int, limit: float, what: str) -> None:
        self.deadline = time.monotonic() + limit
        self.unit_id = unit_id
        self.attempt = attempt
        self.ntasks = ntasks
        self.limit = limit
        self.what = what


class _Worker:
    """The parent's record of one worker process."""

    __slots__ = (
        "cap",
        "eof_at",
        "feeder",
        "inflight",
        "pid",
        "process",
        "ready",
        "results",
        "slot",
        "state",
        "tasks",
        "tasks_sent",
        "timer",
        "unit_seconds",
        "wakeup",
    )

    def __init__(
        self,
        slot: int,
        process: multiprocessing.process.BaseProcess,
        tasks: Connection,
        results: Connection,
        lock: threading.Lock,
    ) -> None:
        self.slot = slot
        self.process = process
        self.pid: int = process.pid or 0
        self.tasks = tasks  # Written by the feeder only.
        self.results = results  # Read by the reader only.
        # Signals the feeder: the worker has room again, new work arrived, or the state changed.
        self.wakeup = threading.Condition(lock)
        self.state = _State.RUNNING
        self.inflight = 0  # Units sent and not yet finished.
        self.cap = 1  # The most units it may hold now; grows as it proves fast.
        self.unit_seconds: float | None = None  # Its running average time per unit.
        self.tasks_sent = 0
        self.ready = False  # It has said it is up (it did not die starting).
        self.eof_at: float | None = None  # When its result pipe closed, if it did.
        self.timer: _Timer | None = None
        self.feeder: threading.Thread | None = None


class _ProcessLink(CoreQueueLink):
    """A queue that tells the feeders when it may have made work assignable."""

    def __init__(
        self,
        scheduler: Scheduler,
        queue_id: int,
        codec: PickleCodec,
        signal_work: Callable[[], None],
        bounded: bool,
    ) -> None:
        super().__init__(scheduler, queue_id, codec)
        self._signal_work = signal_work
        self._bounded = bounded

    def send(self, units: list[Encoded], deadline: float | None) -> list[int]:
        ids = super().send(units, deadline)
        self._signal_work()
        return ids

    def receive(self, deadline: float | None) -> list[tuple[int, Results]]:
        received = super().receive(deadline)
        if self._bounded and received:
            self._signal_work()  # Fetching made room for the queue's held-back units.
        return received


# Open dispatchers, closed at interpreter exit before multiprocessing joins its children.
_OPEN: weakref.WeakSet[MultiProcessTaskDispatcher] = weakref.WeakSet()


def _close_open_dispatchers() -> None:
    for dispatcher in list(_OPEN):
        dispatcher.close()


# Registered after multiprocessing.util's own exit hook, so it runs before it.
atexit.register(_close_open_dispatchers)


class MultiProcessTaskDispatcher(CoreDispatcher):
    """Runs tasks in worker processes on this machine.

    Args:
        num_workers: the number of worker processes; 0 means one per CPU this
            process may use.
        size: see :class:`~papyros.TaskDispatcher`.
        start_method: how workers are started: ``"spawn"`` (the default),
            ``"forkserver"`` or ``"fork"``. ``spawn`` starts each worker as a
            fresh interpreter: it is safe although this process runs threads
            (the dispatcher's own feeder and reader threads, and any of
            yours), which ``fork`` is not (a child forked while another
            thread holds a lock inherits that lock held forever), and it
            leaves no server process behind, which ``forkserver`` does.
            Like every multiprocessing start method but ``fork``, it imports
            your main module in each worker: guard your script's top-level
            code with ``if __name__ == "__main__":``.
        max_tasks_per_child: replace a worker after it has run this many tasks
            (a unit larger than that is still run whole); 0 means never.
        max_attempts: how many times a unit is dispatched before the loss of
            its worker becomes its outcome (:class:`~papyros.WorkerLostError`).

    Tasks, their arguments and results are pickled (see
    :mod:`papyros.serialization`). A worker that dies mid-task is replaced and
    its tasks are retried on other workers; a task whose class sets
    ``time_limit`` is killed, with its worker, when it runs longer, and its
    outcome is a :class:`~papyros.TimeoutError`. ``close()`` lets running
    tasks finish for half a second, then terminates the workers.
    """

    backend_name = "process"

    def __init__(
        self,
        num_workers: int = 0,
        size: int = 0,
        *,
        start_method: str | None = None,
        max_tasks_per_child: int = 0,
        max_attempts: int = 3,
    ) -> None:
        self.num_workers = resolve_workers(num_workers)
        self.max_tasks_per_child = check_size(max_tasks_per_child, "max_tasks_per_child")
        self.start_method = start_method or DEFAULT_START_METHOD
        try:
            self._context = multiprocessing.get_context(self.start_method)
        except ValueError as exc:
            raise ConfigurationError(
                f"unknown start method {self.start_method!r}; this platform supports "
                f"{', '.join(multiprocessing.get_all_start_methods())}"
            ) from exc
        self._pickle = PickleCodec(pieces=True)
        self._pipe_bytes = pipe_bytes(self.num_workers)
        super().__init__(size, codec=self._pickle, max_attempts=max_attempts)
        # Protects the worker table, every _Worker's fields, _work_seq and _closing;
        # the lock of every worker's wakeup condition. Taken before the scheduler's lock.
        self._lock = threading.Lock()
        self._workers: dict[int, _Worker] = {}  # Live (not yet reaped) workers, by slot.
        # Bumped whenever units may have become assignable; feeders compare it to what they saw.
        self._work_seq = 0
        self._closing = False  # Set once by close(): feeders stop, nothing is restarted.
        self._failed_starts = 0  # Workers that died before they were ready, in a row.
        self._feeders: list[threading.Thread] = []  # Feeder threads not yet joined.
        # Written by close() to wake the reader out of its wait().
        self._wake_reader, self._waker = multiprocessing.connection.Pipe(duplex=False)
        self._reader: threading.Thread | None = None
        try:
            for slot in range(self.num_workers):
                self._start_worker(slot)
        except BaseException:
            self.close()
            raise
        self._reader = threading.Thread(target=self._read, name="papyros-results", daemon=True)
        self._reader.start()
        _OPEN.add(self)

    @classmethod
    def from_config(cls, config: Config) -> MultiProcessTaskDispatcher:
        return cls(
            num_workers=config.workers,
            size=config.size,
            start_method=config.start_method or None,
            max_tasks_per_child=config.max_tasks_per_child,
            max_attempts=config.max_attempts,
        )

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.num_workers} workers ({self.start_method}), "
            f"{self._state.value}>"
        )

    # ---------------------------------------------------------------- CoreDispatcher

    def _open_link(self, size: int) -> QueueLink:
        queue_id = self._scheduler.open_queue(size)
        return _ProcessLink(self._scheduler, queue_id, self._pickle, self._signal_work, size > 0)

    def _execute_window(self) -> int:
        return min(1024, max(64, 128 * self.num_workers))

    def _stop_workers(self) -> None:
        """Stop feeding, let running tasks finish briefly, then terminate; reap everything."""
        _OPEN.discard(self)
        with self._lock:
            self._closing = True
            for worker in self._workers.values():
                worker.wakeup.notify()
        # 1. The reader stops first, so that it starts no replacement.
        if self._reader is not None:
            self._waker.send_bytes(b"stop")
            self._reader.join()
        # 2. Each feeder closes its worker's task pipe: an idle worker exits at once.
        with self._lock:
            workers = list(self._workers.values())
            self._workers.clear()
        deadline = time.monotonic() + _CLOSE_GRACE
        for worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
        # 3. Workers still running a task are terminated, then killed.
        busy = [worker for worker in workers if worker.process.is_alive()]
        if busy:
            logger.info("terminating %d busy worker(s) to close the dispatcher", len(busy))
        for worker in busy:
            worker.process.terminate()
        deadline = time.monotonic() + _TERMINATE_GRACE
        for worker in busy:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
        # 4. With every worker gone, no feeder can be blocked writing to one.
        for feeder in self._feeders:
            feeder.join()
        self._feeders.clear()
        for worker in workers:
            worker.results.close()
            worker.process.close()
        self._wake_reader.close()
        self._waker.close()

    # ---------------------------------------------------------------- workers

    def _start_worker(self, slot: int) -> None:
        """Start a worker process and its feeder thread in ``slot``."""
        context: Any = self._context
        tasks_out, tasks_in = context.Pipe(duplex=False)
        results_out, results_in = context.Pipe(duplex=False)
        process = context.Process(
            target=worker_main, args=(tasks_out, results_in), name=f"papyros-worker-{slot}"
        )
        try:
            process.start()
        except Exception as exc:
            tasks_in.close()
            results_out.close()
            raise PapyrosError(
                f"cannot start a worker process ({self.start_method}): {exc}"
            ) from exc
        finally:
            # The child has its own copies: closing ours lets EOF tell us when it is gone.
            tasks_out.close()
            results_in.close()
        for conn in (tasks_in, results_out):
            enlarge_pipe(conn, self._pipe_bytes)
        worker = _Worker(slot, process, tasks_in, results_out, self._lock)
        worker.feeder = threading.Thread(
            target=self._feed, args=(worker,), name=f"papyros-feeder-{slot}", daemon=True
        )
        with self._lock:
            self._workers[slot] = worker
            self._feeders.append(worker.feeder)
        worker.feeder.start()

    def _signal_work(self) -> None:
        """Tell the feeders that units may have become assignable."""
        with self._lock:
            self._work_seq += 1
            for worker in self._workers.values():
                # A feeder whose worker is full would only wake to wait again; the reader
                # wakes it when its worker makes room, and it sees this _work_seq then.
                if _has_room(worker):
                    worker.wakeup.notify()

    def _feed(self, worker: _Worker) -> None:
        """Feeder thread: keep ``worker`` supplied with units while it has room."""
        assign = self._scheduler.assign
        share = self.num_workers
        limit = self.max_tasks_per_child
        seen = -1  # The _work_seq of our last assign() that found nothing.
        try:
            while True:
                with self._lock:
                    while True:
                        if self._closing or worker.state is not _State.RUNNING:
                            return
                        if seen != self._work_seq and _has_room(worker):
                            break
                        worker.wakeup.wait()
                    try:
                        # Never blocks: new work is signalled through _work_seq instead, so
                        # that this thread can also be woken for a change of state.
                        room = 1 if limit else worker.cap - worker.inflight
                        assignments = assign(worker.pid, room, 0.0, share=share)
                    except ClosedTaskDispatcherError:
                        return
                    if not assignments:
                        seen = self._work_seq
                        continue
                    seen = -1
                    worker.inflight += len(assignments)
                    if limit:
                        worker.tasks_sent += assignments[0].ntasks
                        if worker.tasks_sent >= limit:
                            worker.state = _State.RETIRING
                send_framed(
                    worker.tasks,
                    [(a.unit_id, a.attempt, a.ntasks) for a in assignments],
                    [a.payload for a in assignments],
                )
        except OSError:
            pass  # The worker died; the reader re-dispatches what it held.
        finally:
            # EOF on its task pipe tells the worker to stop once it has finished what it holds.
            worker.tasks.close()

    # ---------------------------------------------------------------- the reader

    def _read(self) -> None:
        """Reader thread: take outcomes, notice dead workers, enforce time limits."""
        waiter = ReadyWaiter()
        try:
            while True:
                with self._lock:
                    if self._closing:
                        return
                    workers = list(self._workers.values())
                pipes: dict[Any, _Worker] = {}
                sentinels: dict[Any, _Worker] = {}
                wake_at: float | None = None
                for worker in workers:
                    if worker.eof_at is None:
                        pipes[worker.results] = worker
                    sentinels[worker.process.sentinel] = worker
                    for moment in (
                        worker.timer.deadline if worker.timer else None,
                        worker.eof_at + _EXIT_GRACE if worker.eof_at is not None else None,
                    ):
                        if moment is not None and (wake_at is None or moment < wake_at):
                            wake_at = moment
                timeout = None if wake_at is None else max(0.0, wake_at - time.monotonic())
                ready = waiter.wait([self._wake_reader, *pipes, *sentinels], timeout)
                for item in ready:
                    if item in pipes:
                        self._receive(pipes[item])
                for item in ready:
                    if item in sentinels and sentinels[item].state is not _State.DEAD:
                        self._reap(sentinels[item])
                self._expire(workers)
        except Exception as exc:
            logger.exception("the result reader of %r failed; closing it", self)
            self._scheduler.close(f"its result reader failed ({type(exc).__name__}: {exc})")

    def _receive(self, worker: _Worker) -> None:
        """Take one message of outcomes from a worker."""
        try:
            (done, notice, busy, returned), outcomes = recv_framed(worker.results)
        except (EOFError, OSError):
            worker.eof_at = time.monotonic()  # It is exiting; its sentinel will tell.
            return
        complete = self._scheduler.complete
        pid = worker.pid
        for (unit_id, attempt), outcome in zip(done, outcomes, strict=True):
            complete(pid, unit_id, attempt, outcome)
        if returned:
            # Units it had not started, handed back: other workers may take them.
            self._scheduler.give_back(pid, returned)
        with self._lock:
            worker.ready = True
            worker.inflight -= len(returned)
            if returned:
                self._work_seq += 1
                for other in self._workers.values():
                    if other is not worker and _has_room(other):
                        other.wakeup.notify()
            if done:
                worker.inflight -= len(done)
                per_unit = busy / len(done)
                average = worker.unit_seconds
                average = per_unit if average is None else (average + per_unit) / 2
                worker.unit_seconds = average
                fewest = 1 if average > _ALONE_SECONDS else _MIN_INFLIGHT
                worker.cap = min(
                    _MAX_INFLIGHT, max(fewest, int(_PREFETCH_SECONDS / max(average, 1e-9)))
                )
                timer = worker.timer
                if timer is not None and any(entry[0] == timer.unit_id for entry in done):
                    worker.timer = None
                if self._scheduler.num_tasks():
                    # Its feeder must look again: a worker that holds less may take
                    # more of what is pending (see Scheduler.assign), and one that
                    # holds nothing a unit that runs alone (see Scheduler.worker_lost).
                    self._work_seq += 1
                worker.wakeup.notify()
            if notice is not None:
                unit_id, attempt, ntasks, limit, what = notice
                worker.timer = (
                    None if limit is None else _Timer(unit_id, attempt, ntasks, limit, what)
                )

    def _expire(self, workers: list[_Worker]) -> None:
        """Kill workers whose task ran over its time limit, or that linger after closing."""
        now = time.monotonic()
        for worker in workers:
            if worker.state is _State.DEAD:
                continue
            if worker.timer is not None and worker.timer.deadline <= now:
                worker.process.kill()
                self._reap(worker)
            elif worker.eof_at is not None and worker.eof_at + _EXIT_GRACE <= now:
                worker.process.kill()

    def _reap(self, worker: _Worker) -> None:
        """A worker has exited (or was killed): settle what it held and replace it."""
        while worker.eof_at is None:  # Outcomes it sent before it died still count.
            try:
                if not worker.results.poll():
                    break
            except OSError:
                break
            self._receive(worker)
        worker.process.join()
        exitcode = worker.process.exitcode
        with self._lock:
            retiring = worker.state is _State.RETIRING
            worker.state = _State.DEAD
            worker.wakeup.notify()
            if self._workers.get(worker.slot) is worker:
                del self._workers[worker.slot]
            timer, worker.timer = worker.timer, None
            closing = self._closing
        worker.results.close()
        self._prune_feeders()
        if not closing:
            self._replace(worker, exitcode)
        # Settle what it held only now, so that whoever sees the outcome sees the replacement.
        reason = ""
        if timer is not None:
            error = TimeoutError(
                f"task {timer.what} ran over its time limit of {timer.limit:g} s; its worker "
                f"(pid {worker.pid}) was killed and replaced"
            )
            outcomes: list[Outcome] = [(False, error)] + [
                (False, TimeoutError(str(error))) for _ in range(timer.ntasks - 1)
            ]
            payload = PickleCodec().encode_outcomes(outcomes)  # One buffer: it stays here.
            self._scheduler.complete(worker.pid, timer.unit_id, timer.attempt, payload)
            exitcode, reason = None, "was killed because a task ran over its time limit"
        held = len(self._scheduler.held_by(worker.pid))
        retried = self._scheduler.worker_lost(
            worker.pid, exitcode=exitcode, reason=reason, blame_running=timer is None
        )
        self._signal_work()
        if timer is not None or held or not (retiring or closing):
            logger.warning(
                "worker %s (pid %s) %s; %d unit(s) it held were re-dispatched",
                worker.slot,
                worker.pid,
                reason or _how_it_ended(exitcode),
                len(retried),
            )

    def _replace(self, worker: _Worker, exitcode: int | None) -> None:
        """Start a worker in the slot of one that ended, unless workers keep dying at start."""
        self._failed_starts = 0 if worker.ready else self._failed_starts + 1
        if self._failed_starts >= _MAX_FAILED_STARTS:
            reason = (
                f"{self._failed_starts} worker processes in a row died before they were ready "
                f"(the last {_how_it_ended(exitcode)}). Is the main module guarded by "
                "`if __name__ == '__main__':`, and importable by a fresh interpreter?"
            )
            logger.error("%s The dispatcher is closing.", reason)
            self._scheduler.close(reason)
            return
        self._start_worker(worker.slot)

    def _prune_feeders(self) -> None:
        """Forget feeder threads that have ended (workers may be replaced many times)."""
        with self._lock:
            ended = [feeder for feeder in self._feeders if not feeder.is_alive()]
            self._feeders = [feeder for feeder in self._feeders if feeder.is_alive()]
        for feeder in ended:
            feeder.join()


def _has_room(worker: _Worker) -> bool:
    """Whether ``worker`` has room for more units: half its prefetch, so that they go in batches."""
    return worker.cap - worker.inflight >= max(1, worker.cap // 2)


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"
