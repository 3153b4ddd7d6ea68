"""The base of backends whose scheduling core lives in this process: dummy, thread, process."""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Hashable

from papyros._deadline import check_size
from papyros.dispatcher import QueueLink, TaskDispatcher
from papyros.errors import ClosedTaskDispatcherError
from papyros.scheduler import Assignment, Scheduler
from papyros.task import Encoded, Results, Unit
from papyros.worker import Codec, WorkSource

__all__ = ["CoreDispatcher", "CoreQueueLink", "CoreWorkSource", "available_cpus", "resolve_workers"]


def available_cpus() -> int:
    """The number of CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # Not on Linux.
        return os.cpu_count() or 1


def resolve_workers(num_workers: int) -> int:
    """``num_workers``, with 0 meaning one per CPU this process may use."""
    check_size(num_workers, "num_workers")
    return num_workers or available_cpus()


class CoreQueueLink(QueueLink):
    """A queue whose units go straight into an in-process :class:`Scheduler`."""

    def __init__(self, scheduler: Scheduler, queue_id: int, codec: Codec) -> None:
        self._scheduler = scheduler
        self._queue_id = queue_id
        self._codec = codec

    def encode(self, unit: Unit) -> Encoded:
        return self._codec.encode_unit(unit), len(unit)

    def send(self, units: list[Encoded], deadline: float | None) -> list[int]:
        return self._scheduler.submit(self._queue_id, units, deadline)

    def receive(self, deadline: float | None) -> list[tuple[int, Results]]:
        decode = self._codec.decode_results
        received: list[tuple[int, Results]] = []
        for entry in self._scheduler.fetch(self._queue_id, deadline):
            if entry.error is None:
                received.append((entry.unit_id, decode(entry.outcome)))
            else:
                # The whole unit failed (its worker was lost): each task gets its own copy.
                error = entry.error
                errors = {index: copy.copy(error) for index in range(entry.ntasks)}
                received.append((entry.unit_id, ([None] * entry.ntasks, errors)))
        return received

    def close(self) -> None:
        with contextlib.suppress(ClosedTaskDispatcherError):
            self._scheduler.close_queue(self._queue_id)

    def close_soon(self) -> None:
        self._scheduler.close_queue_soon(self._queue_id)


class CoreWorkSource(WorkSource):
    """A worker in this process that takes units straight from the scheduler.

    Args:
        share: how many workers share the work; a worker takes at most its
            fair share of what is pending, up to ``max_units`` at a time.
    """

    def __init__(
        self, scheduler: Scheduler, worker: Hashable, max_units: int = 1, share: int = 1
    ) -> None:
        self._scheduler = scheduler
        self._worker = worker
        self._max_units = max_units
        self._share = share

    def take(self) -> list[Assignment]:
        try:
            return self._scheduler.assign(self._worker, self._max_units, share=self._share)
        except ClosedTaskDispatcherError:
            return []

    def start(self, assignment: Assignment) -> bool:
        if not self._scheduler.cancelled(self._worker, assignment.unit_id, assignment.attempt):
            return True
        self._scheduler.give_back(self._worker, [assignment.unit_id])  # Its queue drops it.
        return False

    def finish(self, assignment: Assignment, outcome: object) -> None:
        self._scheduler.complete(self._worker, assignment.unit_id, assignment.attempt, outcome)


class CoreDispatcher(TaskDispatcher):
    """A dispatcher whose scheduling core is an in-process :class:`Scheduler`.

    Subclasses start their workers and stop them in ``_stop_workers``.
    """

    def __init__(self, size: int = 0, *, codec: Codec, max_attempts: int = 3) -> None:
        super().__init__(size)
        self._scheduler = Scheduler(size, max_attempts)
        self._codec = codec

    def num_queues(self) -> int:
        self._check_open()
        return self._scheduler.num_queues()

    def num_tasks(self) -> int:
        self._check_open()
        return self._scheduler.num_tasks()

    def _open_link(self, size: int) -> QueueLink:
        return CoreQueueLink(self._scheduler, self._scheduler.open_queue(size), self._codec)

    def _shutdown(self) -> None:
        self._scheduler.close()
        self._stop_workers()

    def _stop_workers(self) -> None:
        """Stop the workers once the scheduler is closed (it wakes idle ones)."""
