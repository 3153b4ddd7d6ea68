"""The iterator behind ``TaskDispatcher.execute``: lazy, bounded, ordered or not, chunked.

It runs entirely in the consumer's thread: each ``next()`` tops up a window
of units from the input, then waits for finished units. No background thread
means an error raised by the input iterable surfaces in ``next()``, where the
caller can see it, and nothing runs after the consumer stops asking.

A ``for`` loop (or ``sum``, ``list``...) takes results through what
:meth:`ResultIterator.__iter__` returns: ``itertools.chain`` over the
iterator of each unit's results, so that a unit whose tasks all succeeded is
read in C, with no Python call per result, which matters at millions of
results per second. A task's exception, or a timeout, is raised through it
and the next ``next()`` goes on, as with ``ResultIterator.__next__``; both
take from the same iterator of the current unit, so they can be mixed freely.

Positions: every unit pulled from the input gets the next position (0, 1,
...). A unit is a chunk of up to ``chunksize`` tasks, or a single outcome
made here: a ``TypeError`` for an input item that is not a Task, or the
``SerializationError`` of a task that cannot be sent.

Tasks should die young. A big chunk is pulled a slice at a time, and a slice
of tasks of one class that their arguments rebuild (``Task._from_args``, as
for every class made by ``Task.subclass``) is kept as their arguments alone
(a :class:`~papyros.task.TaskBatch`, which travels as such tasks do), so each
Task object is freed a few hundred items after it was made. Each chunk is
encoded as soon as it is pulled. Thousands of live tasks would make the
garbage collector run often, visit them all, and move them into its oldest
generation, whose full collections visit every object of the program.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from itertools import chain, islice, repeat
from typing import TYPE_CHECKING, Any

from papyros._lifecycle import Closing
from papyros.errors import SerializationError, TimeoutError
from papyros.scheduler import payload_size
from papyros.task import Encoded, Results, Task, TaskBatch, Unit

if TYPE_CHECKING:
    from papyros.dispatcher import TaskQueue

__all__ = ["ResultIterator"]

# A chunk bigger than this is pulled this many tasks at a time (see the module's docstring).
_SLICE = 128

# Unsent payloads are sent once they reach this size, even with room left in the
# window: large payloads are not all held at once (their tasks may share the data).
_SEND_BYTES = 4 * 1024 * 1024


class ResultIterator(Closing, Iterator[Any]):
    """Iterates over the results of ``TaskDispatcher.execute``; see its documentation."""

    def __init__(
        self,
        queue: TaskQueue,
        tasks: Iterator[Any],
        *,
        timeout: float | None,
        ordered: bool,
        chunksize: int,
        window: int,
        task_type: type[Task] | None = None,
        single: bool = False,
    ) -> None:
        self._queue = queue
        # Tasks; or, for ``map``, argument tuples of ``task_type`` (lone arguments if ``single``).
        self._source = tasks
        self._task_type = task_type
        self._single = single
        self._timeout = timeout
        self._ordered = ordered
        self._chunksize = chunksize
        # Units pulled from the input and not yet fully yielded: what the window bounds.
        # ``window`` is the backend's choice for single tasks; big chunks need fewer
        # units in flight, but always a few per worker to keep the pipe full, and
        # enough tasks to keep workers busy while the client makes the next ones.
        self._window = max(8, min(window, window * 64 // chunksize))
        self._refill_at = max(0, self._window // 2)
        self._outstanding = 0
        self._exhausted = False
        self._input_error: Exception | None = None
        self._next_position = 0
        # Units pulled from the input, encoded, that the dispatcher has not accepted yet,
        # with their positions and sizes; and the sum of those sizes.
        self._unsent: deque[tuple[int, Encoded, int]] = deque()
        self._unsent_bytes = 0
        # Position of each unit sent and not yet received, by unit id.
        self._sent: dict[int, int] = {}
        # Finished units not yet yielded: by position when ordered, else in finishing order.
        self._done: dict[int, Results] = {}
        self._done_fifo: deque[Results] = deque()
        self._yield_position = 0
        # The results of the unit being yielded now, and their iterator (a list iterator,
        # or an _Outcomes where some task raised), which every reader takes from.
        self._values: list[Any] = []
        self._current: Iterator[Any] = iter(self._values)
        self._closed = False

    def __iter__(self) -> Iterator[Any]:
        # See the module's docstring: each unit's iterator, chained in C.
        return chain.from_iterable(_Units(self))

    def __next__(self) -> Any:
        for item in self._current:  # Takes one, if the unit has one left (or raises its error).
            return item
        if self._closed:
            raise StopIteration
        try:
            self._advance()
        except KeyboardInterrupt:
            self.close()
            raise
        return next(self._current)  # A unit has at least one task.

    def close(self) -> None:
        """Stop: cancel every pending task and release the queue. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._unsent.clear()
        self._unsent_bytes = 0
        self._sent.clear()
        self._done.clear()
        self._done_fifo.clear()
        self._values.clear()  # Ends the current unit's iterator, wherever it is held.
        self._queue.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self._closed = True
            self._queue._close_soon()

    # -- internals

    def _advance(self) -> None:
        """Make the next finished unit the current one; StopIteration when there is none left."""
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        while True:
            if self._outstanding <= self._refill_at:
                self._fill(deadline)
            results = self._take_done()
            if results is not None:
                self._outstanding -= 1
                values, errors = results
                self._values = values
                self._current = _Outcomes(values, errors) if errors else iter(values)
                return
            if not self._sent:
                if self._unsent:
                    self._send(deadline)
                    continue
                # Nothing in flight, nothing unsent, nothing done: the input is spent.
                error, self._input_error = self._input_error, None
                self.close()
                if error is not None:
                    raise error
                raise StopIteration
            units = self._queue._receive_units(deadline)
            if not units:
                raise TimeoutError(f"no result within {self._timeout} s")
            for unit_id, unit_results in units:
                position = self._sent.pop(unit_id)
                if self._ordered:
                    self._done[position] = unit_results
                else:
                    self._done_fifo.append(unit_results)

    def _take_done(self) -> Results | None:
        if self._ordered:
            results = self._done.pop(self._yield_position, None)
            if results is not None:
                self._yield_position += 1
            return results
        return self._done_fifo.popleft() if self._done_fifo else None

    def _fill(self, deadline: float | None) -> None:
        """Pull units from the input up to the window, then send what can be sent."""
        while self._outstanding < self._window and not self._exhausted:
            self._pull()
            if self._unsent_bytes >= _SEND_BYTES:
                self._send(time.monotonic() if self._sent else deadline)
                if self._unsent:
                    return  # The dispatcher is full: pull no more until it drains.
        if self._unsent and self._sent:
            # Work is in flight: never block here, a full dispatcher will drain.
            self._send(time.monotonic())
        elif self._unsent:
            self._send(deadline)

    def _pull(self) -> None:
        """Pull one chunk of tasks (or up to a bad item) from the input."""
        if self._task_type is not None:
            items = self._take(self._chunksize)
            if items:
                self._add_unit(TaskBatch(self._task_type, items, single=self._single))
        elif self._chunksize <= _SLICE:
            self._add_tasks(self._take(self._chunksize))
        else:
            self._pull_in_slices()

    def _pull_in_slices(self) -> None:
        """Pull one chunk, keeping slices of tasks that their arguments rebuild as arguments.

        Up to the first slice that is not all of one such class, the arguments
        make one unit; the rest of the chunk is pulled whole, as tasks.
        """
        batch: TaskBatch | None = None
        left = self._chunksize
        while left and not self._exhausted:
            piece = self._take(min(_SLICE, left))
            left -= len(piece)
            if not piece:
                break
            part = TaskBatch.of(piece)
            if part is not None and (batch is None or batch.cls is part.cls):
                if batch is None:
                    batch = part
                else:
                    batch.extend(part)
                continue
            if batch is not None:
                self._add_unit(batch)
                batch = None
            if left and not self._exhausted:
                piece += self._take(left)
            self._add_tasks(piece)
            return
        if batch is not None:
            self._add_unit(batch)

    def _take(self, count: int) -> list[Any]:
        """Up to ``count`` items of the input: fewer if it ended, or raised (kept for later)."""
        items: list[Any] = []
        try:
            # extend() keeps the items taken before an error, so none is lost to it.
            items.extend(islice(self._source, count))
        except Exception as exc:
            self._input_error = exc
        if len(items) < count:
            self._exhausted = True  # The input ended, or raised.
        return items

    def _add_tasks(self, items: list[Any]) -> None:
        """Add a chunk of input items: one unit if all are tasks."""
        if not items:
            return
        if all(map(isinstance, items, repeat(Task))):
            self._add_unit(items)
        else:
            self._pull_mixed(items)

    def _pull_mixed(self, items: list[Any]) -> None:
        """Split a chunk around its items that are not tasks: each is a TypeError, in place."""
        chunk: list[Task] = []
        for item in items:
            if isinstance(item, Task):
                chunk.append(item)
                continue
            if chunk:
                self._add_unit(chunk)
                chunk = []
            error = TypeError(f"execute() takes Task objects; got {type(item).__name__} {item!r}")
            self._add_done(([None], {0: error}))
        if chunk:
            self._add_unit(chunk)

    def _add_unit(self, unit: Unit) -> None:
        """Encode a unit to send; a task that cannot be encoded is an outcome of its own."""
        try:
            encoded = self._queue._encode_unit(unit)
        except SerializationError as exc:
            if len(unit) == 1:
                self._add_done(([None], {0: exc}))
            else:
                # Rare: the tasks of the unit go one by one, each with its own outcome.
                for one in _one_by_one(unit):
                    self._add_unit(one)
            return
        size = payload_size(encoded[0])
        self._unsent.append((self._next_position, encoded, size))
        self._unsent_bytes += size
        self._next_position += 1
        self._outstanding += 1

    def _add_done(self, results: Results) -> None:
        if self._ordered:
            self._done[self._next_position] = results
        else:
            self._done_fifo.append(results)
        self._next_position += 1
        self._outstanding += 1

    def _send(self, deadline: float | None) -> None:
        """Send unsent units; accept a partial send, wait only if nothing is in flight."""
        unsent = self._unsent
        try:
            ids = self._queue._send_units([encoded for _, encoded, _ in unsent], deadline)
        except TimeoutError:
            if self._sent:
                return  # The dispatcher is full; it will drain as our work finishes.
            raise
        for unit_id in ids:
            position, _, size = unsent.popleft()
            self._sent[unit_id] = position
            self._unsent_bytes -= size


def _one_by_one(unit: Unit) -> list[Unit]:
    """A unit's tasks, each as a unit of its own."""
    if isinstance(unit, TaskBatch):
        kwargs = [None] * len(unit) if unit.kwargs is None else unit.kwargs
        return [
            TaskBatch(unit.cls, [args], None if each is None else [each], single=unit.single)
            for args, each in zip(unit.args, kwargs, strict=True)
        ]
    return [[task] for task in unit]


class _Units:
    """The units of a :class:`ResultIterator`, each as the iterator of its results.

    ``itertools.chain.from_iterable`` over this is what a ``for`` loop takes
    results from. An error never leaves ``__next__`` (the chain would end for
    good): it comes as an iterator that raises it, and the chain goes on after
    it, as it goes on after a task's exception raised by a unit's iterator.
    """

    __slots__ = ("_handed", "_results")

    def __init__(self, results: ResultIterator) -> None:
        self._results = results
        # The unit iterator handed out last; one that ``next()`` took on from is not it.
        self._handed: Iterator[Any] | None = None

    def __iter__(self) -> _Units:
        return self

    def __next__(self) -> Iterator[Any]:
        results = self._results
        if results._current is not self._handed:
            self._handed = results._current
            return self._handed
        if results._closed:
            raise StopIteration
        try:
            results._advance()
        except StopIteration:
            raise
        except KeyboardInterrupt as exc:
            results.close()
            return _Raising(exc)
        except Exception as exc:
            return _Raising(exc)
        self._handed = results._current
        return self._handed


class _Raising(Iterator[Any]):
    """An iterator that raises an error once, then ends."""

    __slots__ = ("_error",)

    def __init__(self, error: BaseException) -> None:
        self._error: BaseException | None = error

    def __next__(self) -> Any:
        error, self._error = self._error, None
        if error is None:
            raise StopIteration
        raise error


class _Outcomes(Iterator[Any]):
    """A unit's results, raising each failed task's exception in its place and going on."""

    __slots__ = ("_errors", "_index", "_values")

    def __init__(self, values: list[Any], errors: dict[int, BaseException]) -> None:
        self._values = values
        self._errors = errors
        self._index = 0

    def __next__(self) -> Any:
        index = self._index
        if index >= len(self._values):
            raise StopIteration
        self._index = index + 1
        error = self._errors.get(index)
        if error is not None:
            raise error
        return self._values[index]
