"""The scheduling core: plain Python, no I/O, shared by every backend that owns workers.

It knows queues, work units and workers, never what a unit contains: a unit's
payload and its outcome are opaque objects (bytes, for backends that cross a
process boundary) that the core only routes::

    client threads                    Scheduler                      workers
    ──────────────                    ─────────                      ───────
    submit(queue, units) ──▶ per-queue FIFO of pending units
                             ring of queues with work ───────▶ assign(worker)
                             in-flight table {unit: worker,   ◀─ complete(worker, unit,
                                              attempt}            attempt, outcome)
    fetch(queue) ◀───────── per-queue buffer of finished units  ◀─ worker_lost(worker)
                                                                   (retry or fail)

Rules it enforces:

- every submitted unit yields exactly one :class:`Finished` entry, on the
  queue that submitted it, unless that queue is closed first;
- the dispatcher bound (``size``) counts tasks pending assignment, and blocks
  submitters (a queue held back by its own bound blocks only its own); a
  queue's bound (its ``size``) counts its tasks in flight plus its finished
  tasks not yet fetched, and holds back the queue's pending units, never a
  worker, so a slow consumer cannot deadlock or stall anyone;
- queues with pending work are served round-robin, each in FIFO order;
- a unit carries an attempt number; a completion for any attempt but the
  current one is dropped; a unit whose worker is lost is dispatched again
  (ahead of its queue's other units); a unit that was running each time its
  worker was lost, ``max_attempts`` times, finishes with a
  :class:`~papyros.errors.WorkerLostError` (units that only waited behind it
  are not blamed);
- closing a queue cancels its pending units and drops its buffered and late
  results; closing the scheduler wakes every waiter.

Every blocking method takes an absolute ``time.monotonic()`` deadline (None
means no limit) and waits on a condition, never in a sleep loop.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Hashable, Sequence
from typing import Any

from papyros._deadline import LONGEST_WAIT
from papyros.errors import (
    ClosedTaskDispatcherError,
    ClosedTaskQueueError,
    TimeoutError,
    WorkerLostError,
)

__all__ = ["Assignment", "Finished", "Scheduler", "payload_size"]


class _Unit:
    """A unit of work in the core: one task or a chunk of tasks, as an opaque payload."""

    __slots__ = (
        "assigned",
        "attempt",
        "id",
        "losses",
        "ntasks",
        "payload",
        "queue",
        "suspect",
        "worker",
    )

    def __init__(self, unit_id: int, queue: _Queue, payload: Any, ntasks: int) -> None:
        self.id = unit_id
        self.queue = queue
        self.payload = payload
        self.ntasks = ntasks
        # Dispatches so far; a completion must name the current one.
        self.attempt = 0
        # Times a worker died while running it: what max_attempts bounds.
        self.losses = 0
        # Held by a worker that died holding others too: it may be the one that killed
        # it. From then on it runs alone, so that a death while it runs is its own.
        self.suspect = False
        # When it was last assigned (a scheduler-wide sequence): workers run in this order.
        self.assigned = 0
        self.worker: Hashable | None = None


class Assignment:
    """A unit handed to a worker: run ``payload``, then report ``(unit_id, attempt)``."""

    __slots__ = ("attempt", "ntasks", "payload", "unit_id")

    def __init__(self, unit_id: int, attempt: int, payload: Any, ntasks: int) -> None:
        self.unit_id = unit_id
        self.attempt = attempt
        self.payload = payload
        self.ntasks = ntasks

    def __repr__(self) -> str:
        return f"Assignment(unit={self.unit_id}, attempt={self.attempt}, ntasks={self.ntasks})"


class Finished:
    """A unit's single outcome, as delivered to its queue.

    Exactly one of ``outcome`` (the worker's opaque result) and ``error`` (a
    failure of the unit as a whole, such as a lost worker) is not None.
    """

    __slots__ = ("error", "ntasks", "outcome", "unit_id")

    def __init__(
        self, unit_id: int, ntasks: int, outcome: Any, error: BaseException | None
    ) -> None:
        self.unit_id = unit_id
        self.ntasks = ntasks
        self.outcome = outcome
        self.error = error

    def __repr__(self) -> str:
        return f"Finished(unit={self.unit_id}, ntasks={self.ntasks}, error={self.error!r})"


class _Queue:
    """The core's side of one task queue."""

    __slots__ = (
        "busy_tasks",
        "closed",
        "finished",
        "has_results",
        "id",
        "in_ring",
        "pending",
        "size",
    )

    def __init__(self, queue_id: int, size: int, lock: threading.Lock) -> None:
        self.id = queue_id
        self.size = size
        self.pending: deque[_Unit] = deque()
        self.finished: deque[Finished] = deque()
        # Tasks of this queue in flight or finished but not fetched: what `size` bounds.
        self.busy_tasks = 0
        # Signalled when a finished unit is buffered, or the queue or core closes.
        self.has_results = threading.Condition(lock)
        # Whether the queue is in the scheduler's ring of queues with assignable work.
        self.in_ring = False
        self.closed = False

    def has_room_for(self, unit: _Unit) -> bool:
        return self.size == 0 or self.busy_tasks == 0 or self.busy_tasks + unit.ntasks <= self.size


class Scheduler:
    """The I/O-free scheduling core. All methods are thread-safe.

    Args:
        size: the most tasks that may wait for assignment; 0 means no bound.
            A unit larger than the bound is accepted when nothing is pending.
            The tasks of a queue held back by its own bound count only against
            that queue's own submits, so that a slow consumer stalls no one else.
        max_attempts: how many times a unit may be running on a worker that
            dies before that is reported as the unit's outcome.
    """

    def __init__(self, size: int = 0, max_attempts: int = 3) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, not {size}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, not {max_attempts}")
        self.size = size
        self.max_attempts = max_attempts
        # Protects every field below, and is the lock of every condition here.
        self._lock = threading.Lock()
        # Signalled when a queue joins the ring (work to assign), or on close.
        self._work_ready = threading.Condition(self._lock)
        # Signalled when pending tasks drop (room to submit), or on close.
        self._room_ready = threading.Condition(self._lock)
        self._queues: dict[int, _Queue] = {}
        # Queues with pending units and room for them, served round-robin.
        self._ring: deque[_Queue] = deque()
        self._pending_tasks = 0
        self._inflight: dict[int, _Unit] = {}
        # Tasks of the units in flight: in all, and of each worker.
        self._inflight_tasks = 0
        self._held_tasks: dict[Hashable, int] = {}
        self._held: dict[Hashable, set[int]] = {}
        # Queues abandoned by garbage collection, closed at the next locked call.
        # Finalizers only append here: they may run while this thread holds the lock.
        self._orphans: deque[int] = deque()
        self._ids = itertools.count(1)
        self._assign_seq = itertools.count(1)
        self._closed = False
        self._closed_because = ""  # Why the dispatcher closed itself, if it did.
        self.units_done = 0

    # ---------------------------------------------------------------- queues

    def open_queue(self, size: int = 0) -> int:
        """Register a new queue whose finished-but-unfetched tasks are bounded by ``size``."""
        if size < 0:
            raise ValueError(f"size must be >= 0, not {size}")
        with self._lock:
            self._check_open()
            queue_id = next(self._ids)
            self._queues[queue_id] = _Queue(queue_id, size, self._lock)
            return queue_id

    def close_queue(self, queue_id: int) -> None:
        """Close a queue: cancel its pending units, drop its results. Idempotent."""
        with self._lock:
            self._close_queue(queue_id)

    def close_queue_soon(self, queue_id: int) -> None:
        """Close a queue now if the lock is free, else at the next locked call; safe from
        finalizers and signal handlers.

        They may run while this very thread holds the lock, so they only try to take
        it. An idle dispatcher must not keep an abandoned queue's results until its
        next call: they may be big.
        """
        self._orphans.append(queue_id)
        if self._lock.acquire(blocking=False):
            try:
                self._reap_orphans()
            finally:
                self._lock.release()

    def num_queues(self) -> int:
        with self._lock:
            self._reap_orphans()
            return len(self._queues)

    def num_tasks(self) -> int:
        """The number of tasks waiting to be assigned to a worker."""
        with self._lock:
            self._reap_orphans()
            return self._pending_tasks

    def num_inflight(self) -> int:
        """The number of units assigned to workers and not yet completed."""
        with self._lock:
            return len(self._inflight)

    # ---------------------------------------------------------------- clients

    def submit(
        self, queue_id: int, units: Sequence[tuple[Any, int]], deadline: float | None = None
    ) -> list[int]:
        """Queue units of work, each given as ``(payload, ntasks)``.

        Accepts as many units, in order, as the dispatcher bound allows, waiting
        (until ``deadline``) only while it allows none.

        Returns:
            The ids of the accepted units: a prefix of ``units``, never empty
            unless ``units`` is.

        Raises:
            TimeoutError: the deadline passed before any unit could be accepted.
            ClosedTaskQueueError, ClosedTaskDispatcherError.
        """
        if not units:
            return []
        with self._lock:
            queue = self._live_queue(queue_id)
            while (
                self.size
                and (counted := self._counted_pending(queue))
                and counted + units[0][1] > self.size
            ):
                if not self._wait(self._room_ready, deadline):
                    raise TimeoutError(
                        f"the dispatcher stayed full ({self._pending_tasks} tasks pending, "
                        f"size={self.size})"
                    )
                queue = self._live_queue(queue_id)
            ids = []
            counted = self._counted_pending(queue) if self.size else 0
            for payload, ntasks in units:
                if self.size and counted and counted + ntasks > self.size:
                    break
                unit = _Unit(next(self._ids), queue, payload, ntasks)
                queue.pending.append(unit)
                self._pending_tasks += ntasks
                counted += ntasks
                ids.append(unit.id)
            self._offer(queue)
            return ids

    def fetch(
        self,
        queue_id: int,
        deadline: float | None = None,
        max_units: int = 0,
        *,
        max_bytes: int = 0,
    ) -> list[Finished]:
        """Take finished units of a queue, oldest first, waiting until ``deadline`` for one.

        Returns:
            Up to ``max_units`` (0: all) finished units, and no more than
            ``max_bytes`` (0: no bound) of outcomes that are bytes, but at
            least one; ``[]`` if the deadline passed.

        Raises:
            ClosedTaskQueueError, ClosedTaskDispatcherError.
        """
        with self._lock:
            queue = self._live_queue(queue_id)
            while not queue.finished:
                if not self._wait(queue.has_results, deadline):
                    return []
                queue = self._live_queue(queue_id)
            finished = queue.finished
            if max_units <= 0 or max_units > len(finished):
                max_units = len(finished)
            if max_bytes:
                taken = [finished.popleft()]
                size = payload_size(taken[0].outcome)
                while len(taken) < max_units:
                    size += payload_size(finished[0].outcome)
                    if size > max_bytes:
                        break
                    taken.append(finished.popleft())
            elif max_units == len(finished):
                taken = list(finished)
                finished.clear()
            else:
                taken = [finished.popleft() for _ in range(max_units)]
            queue.busy_tasks -= sum(entry.ntasks for entry in taken)
            self._offer(queue)  # The fetch may have made room for the queue's pending units.
            return taken

    # ---------------------------------------------------------------- workers

    def assign(
        self,
        worker: Hashable,
        max_units: int = 1,
        deadline: float | None = None,
        *,
        share: int = 1,
        max_bytes: int = 0,
    ) -> list[Assignment]:
        """Hand up to ``max_units`` pending units to ``worker``, waiting for one until ``deadline``.

        With ``share`` workers sharing the work, a worker holds no more than
        its fair share (a ``1/share`` part) of the tasks pending or in flight:
        one that already holds that many gets nothing (at once, whatever the
        deadline: it is to ask again when it holds less), and one that holds
        nothing gets at least one unit. So a worker that asks often (one that
        proved fast on earlier, shorter units) cannot take what the others
        are there for: large batches while there is plenty, single units at
        the end.
        Nor does it take more than ``max_bytes`` (0: no bound) of payloads
        that are bytes, beyond its first unit.

        Returns:
            The assignments; ``[]`` if the deadline passed with nothing to assign,
            or if the worker holds its share already.

        Raises:
            ClosedTaskDispatcherError: the scheduler is closed; the worker should stop.
        """
        with self._lock:
            self._check_open()
            self._reap_orphans()
            while not self._ring:
                if not self._wait(self._work_ready, deadline):
                    return []
                self._check_open()
            held = self._held.setdefault(worker, set())
            taken: list[Assignment] = []
            ring = self._ring
            taken_tasks = taken_bytes = 0
            holding = self._held_tasks.get(worker, 0)
            fair_share = (self._pending_tasks + self._inflight_tasks) / share
            if held and (
                holding >= fair_share or any(self._inflight[unit_id].suspect for unit_id in held)
            ):
                # Its share is taken (the rest is for other workers), or it runs a
                # suspect, which runs alone: nothing more until it holds less.
                ring = deque()
            while ring and len(taken) < max_units:
                if taken and holding + taken_tasks >= fair_share:
                    break
                if ring[0].pending[0].suspect and (taken or held):
                    break  # A suspect goes alone, to a worker that holds nothing.
                if max_bytes:
                    taken_bytes += payload_size(ring[0].pending[0].payload)
                    if taken and taken_bytes > max_bytes:
                        break
                queue = ring.popleft()
                unit = queue.pending.popleft()
                queue.busy_tasks += unit.ntasks
                self._pending_tasks -= unit.ntasks
                unit.attempt += 1
                unit.assigned = next(self._assign_seq)
                unit.worker = worker
                self._inflight[unit.id] = unit
                held.add(unit.id)
                taken_tasks += unit.ntasks
                self._inflight_tasks += unit.ntasks
                taken.append(Assignment(unit.id, unit.attempt, unit.payload, unit.ntasks))
                if queue.pending and queue.has_room_for(queue.pending[0]):
                    ring.append(queue)
                else:
                    queue.in_ring = False
                if unit.suspect:
                    break
            if taken:
                self._held_tasks[worker] = holding + taken_tasks
            if self._ring:
                # Wake another idle worker for the work left over.
                self._work_ready.notify()
            if self.size:
                self._room_ready.notify_all()
            return taken

    def cancelled(self, worker: Hashable, unit_id: int, attempt: int) -> bool:
        """Whether a unit ``worker`` took is no longer wanted: its queue or the scheduler closed.

        For a worker to ask before it runs each unit it took ahead, so it takes
        no lock unless a queue was abandoned to the garbage collector: it reads
        the tables as they are. A read that races a close errs towards running
        the unit; closed never turns back to open.
        """
        if self._orphans:
            with self._lock:
                self._reap_orphans()
        unit = self._inflight.get(unit_id)
        return unit is None or unit.queue.closed or unit.attempt != attempt or unit.worker != worker

    def complete(self, worker: Hashable, unit_id: int, attempt: int, outcome: Any) -> bool:
        """Record a unit's outcome.

        Returns:
            True if delivered; False if dropped, because the unit was cancelled,
            its queue closed, or this is a stale attempt (the unit was already
            re-dispatched after its worker was presumed lost).
        """
        with self._lock:
            unit = self._inflight.get(unit_id)
            if unit is None or unit.attempt != attempt or unit.worker != worker:
                return False
            self._release(unit)
            self.units_done += 1
            return self._deliver(unit, Finished(unit.id, unit.ntasks, outcome, None))

    def worker_lost(
        self,
        worker: Hashable,
        *,
        exitcode: int | None = None,
        reason: str = "",
        blame_running: bool = True,
    ) -> list[int]:
        """Declare a worker dead: re-dispatch its in-flight units, or fail those out of attempts.

        A unit is blamed (the loss counts toward ``max_attempts``) only when it
        was all the worker held: then it was the one running. A worker that
        held several may have died running any of those whose outcomes it had
        not sent yet, so none is blamed; they go back ahead of their queues as
        suspects, each to run alone from then on (see :meth:`assign`), and a
        death while one runs is that one's. So no innocent unit is ever
        blamed, and a unit that kills every worker costs at most
        ``max_attempts`` + 1 of them.

        Args:
            worker: the worker, as it called :meth:`assign`.
            exitcode: its exit code, or minus the signal that killed it, if known.
            reason: a short description for the error message.
            blame_running: False when the death is already accounted for (the
                running unit was completed with its own error): blame no unit and
                suspect none.

        Returns:
            The ids of the units that were re-queued.
        """
        with self._lock:
            held = self._held.pop(worker, set())
            self._held_tasks.pop(worker, None)
            units = sorted(
                (self._inflight[unit_id] for unit_id in held if unit_id in self._inflight),
                key=lambda unit: unit.assigned,
            )
            retried = []
            # Newest first, so that appendleft() leaves them in their original order.
            for unit in reversed(units):
                self._release(unit)
                queue = unit.queue
                if queue.closed:
                    continue
                if blame_running and len(units) == 1:
                    unit.losses += 1
                elif blame_running:
                    unit.suspect = True
                if unit.losses < self.max_attempts:
                    queue.pending.appendleft(unit)
                    self._pending_tasks += unit.ntasks
                    self._offer(queue)
                    retried.append(unit.id)
                else:
                    error = WorkerLostError(
                        _lost_message(worker, exitcode, reason, unit.losses),
                        worker=worker,
                        exitcode=exitcode,
                        attempts=unit.losses,
                    )
                    self._deliver(unit, Finished(unit.id, unit.ntasks, None, error))
            return retried

    def give_back(self, worker: Hashable, unit_ids: Sequence[int]) -> list[int]:
        """Take back units that ``worker`` holds but has not started, for other workers.

        They go back ahead of their queues, in their order, unblamed; a late
        completion of one by ``worker`` is dropped.

        Returns:
            The ids of the units that went back (those the worker still held).
        """
        with self._lock:
            held = self._held.get(worker, set())
            units = sorted(
                (self._inflight[unit_id] for unit_id in unit_ids if unit_id in held),
                key=lambda unit: unit.assigned,
            )
            for unit in reversed(units):
                self._release(unit)
                queue = unit.queue
                if not queue.closed:
                    queue.pending.appendleft(unit)
                    self._pending_tasks += unit.ntasks
                    self._offer(queue)
            return [unit.id for unit in units]

    def abandoned(self, worker: Hashable) -> list[int]:
        """The ids of the units in flight on ``worker`` whose queue closed since it took
        them: it need not start them (it gives them back, see :meth:`give_back`)."""
        with self._lock:
            self._reap_orphans()
            return [
                unit_id
                for unit_id in self._held.get(worker, ())
                if self._inflight[unit_id].queue.closed
            ]

    def held_by(self, worker: Hashable) -> list[int]:
        """The ids of the units in flight on ``worker``."""
        with self._lock:
            return sorted(self._held.get(worker, ()))

    # ---------------------------------------------------------------- lifecycle

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, reason: str = "") -> None:
        """Refuse all further calls and wake every waiter. Idempotent.

        ``reason`` says why, when the dispatcher closes itself: every call refused
        from then on says it too.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._closed_because = reason
            for queue in self._queues.values():
                queue.closed = True
                queue.has_results.notify_all()
            self._queues.clear()
            self._ring.clear()
            self._inflight.clear()
            self._inflight_tasks = 0
            self._held.clear()
            self._held_tasks.clear()
            self._pending_tasks = 0
            self._work_ready.notify_all()
            self._room_ready.notify_all()

    # ---------------------------------------------------------------- internals (lock held)

    def _counted_pending(self, queue: _Queue) -> int:
        """The pending tasks that count against ``size`` for a submit to ``queue``.

        Those of other queues held back by their own bound (their results are
        not being fetched) do not: one slow consumer must not stall the other
        clients. The queue's own do, so that its own pusher is the one to wait.
        """
        held_back = sum(
            unit.ntasks
            for other in self._queues.values()
            if other is not queue and other.pending and not other.in_ring
            for unit in other.pending
        )
        return self._pending_tasks - held_back

    def _check_open(self) -> None:
        if self._closed:
            because = self._closed_because
            if because:
                raise ClosedTaskDispatcherError(f"the dispatcher closed itself: {because}")
            raise ClosedTaskDispatcherError("the dispatcher is closed")

    def _live_queue(self, queue_id: int) -> _Queue:
        self._check_open()
        if self._orphans:
            self._reap_orphans()
        queue = self._queues.get(queue_id)
        if queue is None:
            raise ClosedTaskQueueError("the task queue is closed")
        return queue

    def _wait(self, condition: threading.Condition, deadline: float | None) -> bool:
        """Wait once on ``condition``; False if the deadline has passed."""
        if deadline is None:
            condition.wait()
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        condition.wait(min(remaining, LONGEST_WAIT))
        return True

    def _offer(self, queue: _Queue) -> None:
        """Put a queue in the ring if it has pending work it has room for."""
        if queue.in_ring or not queue.pending or not queue.has_room_for(queue.pending[0]):
            return
        queue.in_ring = True
        self._ring.append(queue)
        self._work_ready.notify()

    def _release(self, unit: _Unit) -> None:
        """Take a unit out of the in-flight table and give back its queue's room."""
        del self._inflight[unit.id]
        self._inflight_tasks -= unit.ntasks
        held = self._held.get(unit.worker)
        if held is not None:
            held.discard(unit.id)
            self._held_tasks[unit.worker] -= unit.ntasks
        unit.worker = None
        unit.queue.busy_tasks -= unit.ntasks

    def _deliver(self, unit: _Unit, entry: Finished) -> bool:
        queue = unit.queue
        if queue.closed:
            return False
        queue.finished.append(entry)
        queue.busy_tasks += unit.ntasks
        queue.has_results.notify()
        return True

    def _close_queue(self, queue_id: int) -> None:
        queue = self._queues.pop(queue_id, None)
        if queue is None:
            return
        queue.closed = True
        self._pending_tasks -= sum(unit.ntasks for unit in queue.pending)
        queue.pending.clear()
        queue.finished.clear()
        if queue.in_ring:
            self._ring.remove(queue)
            queue.in_ring = False
        queue.has_results.notify_all()
        self._room_ready.notify_all()

    def _reap_orphans(self) -> None:
        while self._orphans:
            self._close_queue(self._orphans.popleft())


def payload_size(payload: Any) -> int:
    """The size of a payload or outcome that is bytes, or a tuple of bytes; 0 for anything else."""
    if isinstance(payload, tuple):
        return sum(payload_size(piece) for piece in payload)
    return len(payload) if isinstance(payload, (bytes, bytearray)) else 0


def _lost_message(worker: Hashable, exitcode: int | None, reason: str, attempts: int) -> str:
    how = reason or "died"
    if exitcode is not None and exitcode < 0:
        how = f"was killed by signal {-exitcode}"
        if -exitcode == 9:
            how += " (often: out of memory)"
    elif exitcode is not None:
        how = f"exited with code {exitcode}"
    times = "once" if attempts == 1 else f"{attempts} times"
    return (
        f"worker {worker} {how} while running this task; the task was dispatched "
        f"{times}, and each time its worker was lost"
    )
