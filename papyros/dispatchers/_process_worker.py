"""The worker side of the process backend: what runs inside each worker process.

:func:`worker_main` is the body of a worker process; ``multiprocessing``
starts it by name (so it stays a module-level function). It runs the worker
loop (:func:`papyros.worker.work`) over the worker's two pipes, framed by
:mod:`papyros.dispatchers._pipes`: batches of units in, batches of outcomes
out, with the units of a batch that turned out slow and were not started
handed back. The dispatcher side, which feeds those pipes and reads them, is
:mod:`papyros.dispatchers.process`.
"""

from __future__ import annotations

import signal
import time
from multiprocessing.connection import Connection
from typing import Any

from papyros.dispatchers._pipes import recv_framed, send_framed
from papyros.scheduler import Assignment
from papyros.serialization import Payload, PickleCodec, describe_task
from papyros.task import ExceptionTypes, Outcome, Task, TaskBatch
from papyros.worker import WorkSource, work

__all__ = ["worker_main"]

# A worker sends its finished outcomes at least this often while it keeps running units.
_FLUSH_SECONDS = 0.002

# A batch sized from earlier, shorter units can hold far more work than the parent
# wants a worker to hold (about _KEEP_SECONDS). Once a batch has run this long, the
# worker keeps about _KEEP_SECONDS of what is left, at the pace it has seen, and hands
# the rest back for idle workers, if that is more than as much again.
_HAND_BACK_AFTER = 0.02
_KEEP_SECONDS = 0.005


class _Timed(Task):
    """Wraps a task to tell the parent when it starts, so the parent can enforce its limit."""

    __slots__ = ("_inner", "_source")

    def __init__(self, inner: Task, source: _PipeWorkSource) -> None:
        self._inner = inner
        self._source = source

    def _run(self, escaping: ExceptionTypes = BaseException) -> Outcome:
        self._source.task_starting(self._inner)
        return self._inner._run(escaping)


class _WorkerCodec(PickleCodec):
    """The worker's codec: a unit that cannot be unpickled fails task by task, never the worker."""

    def __init__(self, source: _PipeWorkSource) -> None:
        super().__init__(pieces=True)
        self._source = source

    def decode_unit(self, payload: Payload) -> list[Task] | TaskBatch:
        try:
            unit = super().decode_unit(payload)
        except Exception as exc:
            return self.unreadable_unit(exc, self._source.current_ntasks())
        if isinstance(unit, TaskBatch):
            if unit.cls.time_limit is None:
                return unit
            tasks = list(unit)
        else:
            tasks = unit
            if all(type(task).time_limit is None for task in tasks):
                return tasks
        return [_Timed(task, self._source) for task in tasks]


class _PipeWorkSource(WorkSource):
    """A worker process's end of its two pipes: batches of units in, batches of outcomes out."""

    def __init__(self, tasks: Connection, results: Connection) -> None:
        self._tasks = tasks
        self._results = results
        self._batch: list[Assignment] = []
        self._index = 0
        # Outcomes not sent yet: (unit id, attempt) and the payload of each.
        self._done: list[tuple[int, int]] = []
        self._outcomes: list[bytes] = []
        self._busy = 0.0  # Seconds spent running the units in _done.
        self._mark = self._batch_started = time.monotonic()
        self._last_flush = self._mark
        self._timer_on = False  # Whether the parent is timing a task of ours.

    def ready(self) -> None:
        self._send(None)

    def take(self) -> list[Assignment]:
        if self._done:
            self._send(None)
        try:
            units, payloads = recv_framed(self._tasks)
        except EOFError:
            return []  # The parent closed the pipe: stop.
        self._batch = [
            Assignment(unit_id, attempt, payload, ntasks)
            for (unit_id, attempt, ntasks), payload in zip(units, payloads, strict=True)
        ]
        self._index = 0
        self._mark = self._batch_started = time.monotonic()
        return self._batch

    def finish(self, assignment: Assignment, outcome: Any) -> None:
        now = time.monotonic()
        self._busy += now - self._mark
        self._mark = now
        self._index += 1
        self._done.append((assignment.unit_id, assignment.attempt))
        self._outcomes.append(outcome)
        left = len(self._batch) - self._index
        elapsed = now - self._batch_started
        returned: list[int] = []
        if left > 2 and elapsed > _HAND_BACK_AFTER:
            keep = max(1, int(_KEEP_SECONDS * self._index / elapsed))
            if left > 2 * keep:
                start = self._index + keep
                returned = [each.unit_id for each in self._batch[start:]]
                del self._batch[start:]  # work() iterates over this very list: it ends early.
        # The parent times a unit with a time limit until its outcome arrives: that one
        # goes at once, or the next unit would run on its clock.
        if returned or self._timer_on or now - self._last_flush >= _FLUSH_SECONDS:
            self._timer_on = False
            self._send(None, returned)

    def current_ntasks(self) -> int:
        return self._batch[self._index].ntasks

    def task_starting(self, task: Task) -> None:
        """Before each task of a unit with a time limit: let the parent start (or stop) timing."""
        limit = type(task).time_limit
        if limit is None and not self._timer_on:
            return
        self._timer_on = limit is not None
        current = self._batch[self._index]
        what = describe_task(task) if limit is not None else ""
        self._send((current.unit_id, current.attempt, current.ntasks, limit, what))

    def _send(
        self,
        notice: tuple[int, int, int, float | None, str] | None,
        returned: list[int] | None = None,
    ) -> None:
        now = time.monotonic()
        self._busy += now - self._mark
        self._mark = now
        done, outcomes = self._done, self._outcomes
        self._done, self._outcomes = [], []
        busy, self._busy = self._busy, 0.0
        self._last_flush = now
        send_framed(self._results, (done, notice, busy, returned or []), outcomes)


def worker_main(tasks: Connection, results: Connection) -> None:
    """The body of a worker process."""
    # Ctrl-C is the client's to handle: it cancels its work and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    source = _PipeWorkSource(tasks, results)
    try:
        source.ready()
        # Whatever a task raises is its outcome, SystemExit included, as on the thread
        # backend: this process is stopped by signals, not by exceptions.
        work(source, _WorkerCodec(source), escaping=())
    except (BrokenPipeError, ConnectionResetError):
        pass  # The parent is gone; nobody is waiting for our outcomes.
    finally:
        tasks.close()
        results.close()
