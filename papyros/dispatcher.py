"""The dispatcher contract, written once above every backend.

A :class:`TaskDispatcher` hands out :class:`TaskQueue` objects; a queue is a
private channel between one client and the dispatcher: tasks go in with
:meth:`~TaskQueue.push`, their outcomes come back with :meth:`~TaskQueue.pop`.
:meth:`TaskDispatcher.execute` builds the common case on top of one queue.

A backend supplies three things: a :class:`QueueLink` per queue (how units of
tasks reach its workers and how their outcomes come back), ``num_queues`` /
``num_tasks``, and ``_shutdown``. Everything else, including chunking,
ordering, timeouts and bounds, lives here and in :mod:`papyros._execute`.
"""

from __future__ import annotations

import enum
import functools
import sys
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from papyros._deadline import check_size, deadline_after
from papyros._lifecycle import Closing
from papyros.errors import ClosedTaskDispatcherError, ClosedTaskQueueError, TimeoutError
from papyros.task import Encoded, Outcome, Results, Task, Unit, outcomes_of

if TYPE_CHECKING:
    from papyros._execute import ResultIterator
    from papyros.config import Config

__all__ = ["QueueLink", "TaskDispatcher", "TaskQueue"]


class QueueLink(ABC):
    """A backend's side of one :class:`TaskQueue`: moves units of tasks out, outcomes in.

    A unit is a list of tasks that travels and runs as one piece of work. It is
    encoded (:meth:`encode`) as soon as it is made, so that its tasks can be
    freed, and sent (:meth:`send`) encoded, many units at a time.
    """

    @abstractmethod
    def encode(self, unit: Unit) -> Encoded:
        """A unit as it travels: ``(payload, number of tasks)``.

        Raises:
            SerializationError: a task cannot be serialized; the message names it.
        """

    @abstractmethod
    def send(self, units: list[Encoded], deadline: float | None) -> list[int]:
        """Submit encoded units; accept as many as the dispatcher's bound allows.

        Returns:
            An id for each accepted unit: a prefix of ``units``, never empty.

        Raises:
            TimeoutError: ``deadline`` passed before any unit was accepted.
        """

    @abstractmethod
    def receive(self, deadline: float | None) -> list[tuple[int, Results]]:
        """Return finished units as ``(unit id, their results)``.

        Waits until ``deadline`` for at least one; returns ``[]`` if it passes.
        """

    @abstractmethod
    def close(self) -> None:
        """Cancel the queue's pending units and release it. Idempotent."""

    def close_soon(self) -> None:
        """Close from a finalizer: must not block or take locks the caller may hold."""
        self.close()


class _State(enum.Enum):
    OPEN = "open"  # accepting work
    CLOSED = "closed"  # close() was called; every call but close() raises


class TaskQueue(Closing):
    """A private channel between one client and the dispatcher.

    Made by :meth:`TaskDispatcher.make_queue`, not directly. Each task pushed
    yields exactly one outcome here: its result, or the exception it raised.
    Closing the queue (or leaving its ``with`` block) cancels the tasks it
    still has pending. A queue is meant to be used by one thread at a time.
    """

    def __init__(self, link: QueueLink, size: int = 0) -> None:
        self._link = link
        self._size = size
        # Outcomes received from the backend and not yet popped, oldest first.
        self._ready: deque[Outcome] = deque()
        # Tasks pushed whose outcome has not been popped yet.
        self._outstanding = 0
        self._state = _State.OPEN

    @property
    def size(self) -> int:
        """The bound on finished results waiting to be popped (0: none)."""
        return self._size

    @property
    def closed(self) -> bool:
        return self._state is _State.CLOSED

    def push(self, task: Task, timeout: float | None = None) -> None:
        """Send a task to be executed.

        Args:
            task: the task.
            timeout: seconds to wait while the dispatcher is full (None: no limit).

        Raises:
            TypeError: ``task`` is not a :class:`Task`.
            TimeoutError: the dispatcher stayed full for ``timeout`` seconds.
            SerializationError: the task cannot be sent to the workers.
            ClosedTaskQueueError, ClosedTaskDispatcherError.
        """
        if not isinstance(task, Task):
            raise TypeError(f"push() takes a Task, not {type(task).__name__} {task!r}")
        deadline = deadline_after(timeout)
        self._check_open()
        self._link.send([self._link.encode([task])], deadline)
        self._outstanding += 1

    def pop(self, timeout: float | None = None) -> Any:
        """Return the result of the next finished task, or raise the exception it raised.

        Args:
            timeout: seconds to wait for a task to finish (None: no limit; 0:
                only take what has already finished).

        Raises:
            TimeoutError: no task finished within ``timeout``; nothing is lost.
            ClosedTaskQueueError, ClosedTaskDispatcherError.
            Exception: whatever the task raised.
        """
        deadline = deadline_after(timeout)
        self._check_open()
        ready = self._ready
        while not ready:
            if not self._receive(deadline):
                raise TimeoutError(f"no task finished within {timeout} s")
        return _unwrap(self._take())

    def pop_many(self, timeout: float | None = 0) -> list[Any]:
        """Pop the results of every task that finishes within ``timeout`` seconds.

        With ``timeout=0`` it returns at once the results of the tasks that
        have already finished. Otherwise it keeps collecting until the
        deadline passes or every task pushed to this queue has been popped;
        ``timeout=None`` waits for all of them.

        A task's exception is never lost: if results were collected before
        it, they are returned and the exception is left first in line for the
        next ``pop`` or ``pop_many``; otherwise it is raised.

        Raises:
            ClosedTaskQueueError, ClosedTaskDispatcherError.
            Exception: the first exception, if no result precedes it.
        """
        deadline = deadline_after(timeout)
        self._check_open()
        results: list[Any] = []
        ready = self._ready
        while True:
            while ready:
                ok, value = ready[0]
                if not ok:
                    if results:
                        return results
                    self._take()
                    raise value
                results.append(self._take()[1])
            if not self._outstanding or not self._receive(deadline):
                return results

    def close(self) -> None:
        """Close the queue and cancel its pending tasks. Idempotent."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        self._ready.clear()
        self._link.close()

    def __del__(self) -> None:
        if getattr(self, "_state", _State.CLOSED) is _State.OPEN:
            self._close_soon()

    def _close_soon(self) -> None:
        """Close from a finalizer, which may run in any thread, at any point."""
        if self._state is _State.OPEN:
            self._state = _State.CLOSED
            self._link.close_soon()

    # -- used by ResultIterator, which owns its queue and tracks units itself

    def _encode_unit(self, unit: Unit) -> Encoded:
        return self._link.encode(unit)

    def _send_units(self, units: list[Encoded], deadline: float | None) -> list[int]:
        self._check_open()
        return self._link.send(units, deadline)

    def _receive_units(self, deadline: float | None) -> list[tuple[int, Results]]:
        self._check_open()
        return self._link.receive(deadline)

    # -- internals

    def _check_open(self) -> None:
        if self._state is _State.CLOSED:
            raise ClosedTaskQueueError("the task queue is closed")

    def _receive(self, deadline: float | None) -> bool:
        """Move finished outcomes into ``_ready``; False if the deadline passed first."""
        units = self._link.receive(deadline)
        for _, (values, errors) in units:
            self._ready.extend(outcomes_of(values, errors))
        return bool(units)

    def _take(self) -> Outcome:
        self._outstanding -= 1
        return self._ready.popleft()


def _check_iteration(timeout: float | None, ordered: bool, chunksize: int) -> None:
    """Validate the options of ``execute`` and ``map``."""
    if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
        raise ValueError(f"chunksize must be an int >= 1, not {chunksize!r}")
    if not isinstance(ordered, bool):  # ordered="no" would be true.
        raise TypeError(f"ordered must be True or False, not {ordered!r}")
    deadline_after(timeout)


def _unwrap(outcome: Outcome) -> Any:
    ok, value = outcome
    if ok:
        return value
    raise value


class TaskDispatcher(Closing, ABC):
    """Runs tasks on workers; the one interface every backend implements.

    Args:
        size: the most tasks that may wait to be assigned to a worker; pushing
            more blocks (or times out). 0 means no bound.

    A dispatcher is a context manager; :meth:`close` is idempotent and any
    other call after it raises :class:`ClosedTaskDispatcherError`.
    """

    #: The name of this backend in the registry (``papyros.get_dispatcher``).
    backend_name: str = ""

    def __init__(self, size: int = 0) -> None:
        self._size = check_size(size)
        self._state = _State.OPEN
        # Makes close() idempotent when called from several threads at once.
        self._close_lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Config) -> TaskDispatcher:
        """Build the dispatcher that ``config`` describes (used by ``get_dispatcher``)."""
        return cls(size=config.size)

    @property
    def size(self) -> int:
        return self._size

    @property
    def closed(self) -> bool:
        return self._state is _State.CLOSED

    def make_queue(self, size: int = 0) -> TaskQueue:
        """Open a new queue to push tasks to and pop their outcomes from.

        Args:
            size: the most finished results that may wait to be popped; while
                the queue is full its further tasks wait, unassigned. 0 means
                no bound.

        Raises:
            ClosedTaskDispatcherError: the dispatcher is closed.
        """
        check_size(size)
        self._check_open()
        return TaskQueue(self._open_link(size), size)

    def execute(
        self,
        tasks: Iterable[Task],
        timeout: float | None = None,
        ordered: bool = False,
        chunksize: int = 1,
        qsize: int = 0,
    ) -> ResultIterator:
        """Execute tasks and iterate over their results.

        The input is consumed lazily, as results are consumed (only a window
        of work is ever in flight), so it may be a generator of any length.

        Args:
            tasks: an iterable of :class:`Task` objects.
            timeout: each ``next()`` raises :class:`~papyros.TimeoutError` if
                no result arrives within this many seconds; the iteration can
                go on after it, and nothing is lost. None: no limit.
            ordered: yield results in input order (default: as they finish).
            chunksize: how many tasks travel and run together as one unit.
            qsize: the ``size`` of the underlying queue.

        Returns:
            An iterator of results. ``next()`` raises the exception of a task
            that raised one, and the following ``next()`` goes on. An item of
            ``tasks`` that is not a Task comes out as a ``TypeError`` in its
            place, and a task that cannot be sent to the workers as a
            :class:`~papyros.SerializationError` in its place; the other tasks
            of its chunk still run. An exception raised by ``tasks`` itself
            comes out once every result before it has been yielded, and ends
            the iteration.
            Closing the iterator (``close()``, ``with``, or dropping it)
            cancels the tasks it has pending.

        Raises:
            TypeError: ``ordered`` is not a bool.
            ValueError: ``chunksize`` < 1, or a negative ``timeout`` or ``qsize``.
            ClosedTaskDispatcherError: the dispatcher is closed.
        """
        _check_iteration(timeout, ordered, chunksize)
        return self._iterate(iter(tasks), timeout, ordered, chunksize, qsize)

    def map(
        self,
        task_type: type[Task] | Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        ordered: bool = False,
        chunksize: int = 1,
        qsize: int = 0,
    ) -> ResultIterator:
        """Run ``task_type`` on arguments taken from ``iterables``; iterate over the results.

        ``dispatcher.map(square, numbers)`` is ``dispatcher.execute(square(n)
        for n in numbers)``, and ``map(power, bases, exponents)`` pairs its
        inputs as the builtin :func:`map` does (it stops at the shortest),
        but no Task object is made per item: the arguments travel as they
        are, a chunk at a time, which is several times faster for small
        tasks. Everything :meth:`execute` says holds here.

        Args:
            task_type: a :class:`Task` subclass, such as one made by
                ``@Task.subclass()``; or any other callable, such as a plain
                function, which runs as the Task type ``Task.subclass()`` makes
                of it (with the default class options).
            *iterables: one iterable per positional argument of the task.
            timeout, ordered, chunksize, qsize: as for :meth:`execute`.

        Returns:
            An iterator of results, as :meth:`execute` returns.

        Raises:
            TypeError: ``task_type`` is not callable, no iterable is given, or
                ``ordered`` is not a bool.
            ValueError: ``chunksize`` < 1, or a negative ``timeout`` or ``qsize``.
            ClosedTaskDispatcherError: the dispatcher is closed.
        """
        task_type = _task_type_of(task_type)
        if not iterables:
            raise TypeError("map() needs at least one iterable of arguments")
        _check_iteration(timeout, ordered, chunksize)
        # One iterable: each item is the only argument, no tuple needed. Several: paired
        # as the builtin map() pairs them, up to the shortest.
        single = len(iterables) == 1
        arguments = iter(iterables[0]) if single else zip(*iterables, strict=False)
        return self._iterate(arguments, timeout, ordered, chunksize, qsize, task_type, single)

    def _iterate(
        self,
        source: Iterator[Any],
        timeout: float | None,
        ordered: bool,
        chunksize: int,
        qsize: int,
        task_type: type[Task] | None = None,
        single: bool = False,
    ) -> ResultIterator:
        """The iterator of ``execute`` (tasks) or ``map`` (arguments of ``task_type``)."""
        from papyros._execute import ResultIterator

        queue = self.make_queue(qsize)
        return ResultIterator(
            queue,
            source,
            timeout=timeout,
            ordered=ordered,
            chunksize=chunksize,
            window=self._execute_window(),
            task_type=task_type,
            single=single,
        )

    @abstractmethod
    def num_queues(self) -> int:
        """The number of open queues (including those of running ``execute`` calls)."""

    @abstractmethod
    def num_tasks(self) -> int:
        """The number of tasks waiting to be assigned to a worker."""

    def close(self) -> None:
        """Cancel all pending work, stop the workers and release every resource.

        Idempotent. Queues and ``execute`` iterators of a closed dispatcher
        raise :class:`ClosedTaskDispatcherError`.
        """
        with self._close_lock:
            if self._state is _State.CLOSED:
                return
            self._state = _State.CLOSED
            self._shutdown()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._state.value}>"

    # -- what a backend provides

    @abstractmethod
    def _open_link(self, size: int) -> QueueLink:
        """Open the backend's side of a new queue."""

    @abstractmethod
    def _shutdown(self) -> None:
        """Cancel pending work, stop workers, release resources; called once."""

    def _execute_window(self) -> int:
        """How many units one ``execute`` call keeps in flight or unconsumed."""
        return 64

    def _check_open(self) -> None:
        if self._state is _State.CLOSED:
            raise ClosedTaskDispatcherError("the dispatcher is closed")


def _task_type_of(target: type[Task] | Callable[..., Any]) -> type[Task]:
    """What ``map`` runs: ``target`` if it is a Task type, else the Task type of a callable."""
    if isinstance(target, type) and issubclass(target, Task):
        return target
    if not callable(target):
        raise TypeError(
            f"map() takes a function or a Task type (e.g. a function decorated with "
            f"@papyros.Task.subclass()), not {target!r}"
        )
    if isinstance(target, Hashable) and _found_by_name(target):
        return _named_task_type(target)
    # A lambda, a closure, a bound method...: a type of its own each time, so that no
    # cache keeps it alive, with whatever it holds.
    return Task.subclass()(target)


def _found_by_name(function: Callable[..., Any]) -> bool:
    """Whether ``function`` is what its module and qualified name lead to: it lives as long
    as its module does (a module-level function, a builtin)."""
    found: Any = sys.modules.get(getattr(function, "__module__", None) or "")
    for name in str(getattr(function, "__qualname__", "")).split("."):
        found = getattr(found, name, None)
    return found is function


@functools.lru_cache(maxsize=256)
def _named_task_type(function: Callable[..., Any]) -> type[Task]:
    """The Task type of a function found by name, kept: mapping it again makes no new class
    (a worker learns each class once)."""
    return Task.subclass()(function)
