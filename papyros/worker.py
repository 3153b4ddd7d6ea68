"""The worker loop: take units, run their tasks, hand back outcomes, repeat.

One piece of code for thread, process and remote workers; only the
:class:`WorkSource` (how a worker talks to the scheduling core) and the
:class:`Codec` (how units and outcomes are represented in transit) differ.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from papyros.scheduler import Assignment
from papyros.task import ExceptionTypes, Outcome, Results, Task, TaskBatch, Unit

__all__ = ["Codec", "InProcessCodec", "WorkSource", "run_unit", "work"]


class Codec(ABC):
    """How units of tasks and their outcomes are represented between client and worker."""

    @abstractmethod
    def encode_unit(self, tasks: Unit) -> Any:
        """Client side: a unit's tasks to its payload. Raises SerializationError."""

    @abstractmethod
    def decode_unit(self, payload: Any) -> list[Task] | TaskBatch:
        """Worker side: a payload back to tasks (or a batch of them, to run as one)."""

    @abstractmethod
    def encode_results(self, values: list[Any], errors: dict[int, BaseException]) -> Any:
        """Worker side: a unit's results (see :data:`~papyros.task.Results`) to their
        payload; never raises for a bad result."""

    def encode_outcomes(self, outcomes: list[Outcome]) -> Any:
        """Worker side: the outcome of each task of a unit to their payload."""
        values = [value if ok else None for ok, value in outcomes]
        errors = {index: value for index, (ok, value) in enumerate(outcomes) if not ok}
        return self.encode_results(values, errors)

    @abstractmethod
    def decode_results(self, payload: Any) -> Results:
        """Client side: a payload back to the unit's results."""


class InProcessCodec(Codec):
    """For workers that share the client's memory: objects travel as they are."""

    def encode_unit(self, tasks: Unit) -> Any:
        return tasks

    def decode_unit(self, payload: Any) -> list[Task] | TaskBatch:
        return payload  # type: ignore[no-any-return]

    def encode_results(self, values: list[Any], errors: dict[int, BaseException]) -> Any:
        return values, errors

    def decode_results(self, payload: Any) -> Results:
        return payload  # type: ignore[no-any-return]


class WorkSource(ABC):
    """A worker's connection to the scheduling core."""

    @abstractmethod
    def take(self) -> list[Assignment]:
        """Wait for the next units to run; ``[]`` tells the worker to stop."""

    @abstractmethod
    def finish(self, assignment: Assignment, outcome: Any) -> None:
        """Hand back the encoded outcome of a unit."""

    def start(self, assignment: Assignment) -> bool:
        """Called just before a unit taken earlier runs: False if it was cancelled since.

        A source that can tell (its queue was closed, or the dispatcher) lets go
        of a cancelled unit here, and the worker skips it. This one cannot tell.
        """
        return True


def run_unit(payload: Any, codec: Codec, *, escaping: ExceptionTypes = BaseException) -> Any:
    """Run every task of a unit, in order, and return their encoded outcomes.

    A task's ``Exception`` is its outcome. So is any other exception it raises
    (SystemExit, KeyboardInterrupt, GeneratorExit), unless it is one of
    ``escaping``: that propagates, and the unit is left without an outcome.
    """
    unit = codec.decode_unit(payload)
    try:
        if isinstance(unit, TaskBatch):
            return codec.encode_results(*unit.run(escaping))
        return codec.encode_outcomes([task._run(escaping) for task in unit])
    except Exception as exc:
        # Not a task's exception (that is its outcome) but a fault around the tasks, in
        # a Task subclass's own machinery: every task of the unit fails with it, and the
        # worker lives on (a worker thread that died would leave its units unfinished).
        return codec.encode_results([None] * len(unit), dict.fromkeys(range(len(unit)), exc))


def work(source: WorkSource, codec: Codec, *, escaping: ExceptionTypes = BaseException) -> None:
    """Run units from ``source`` until it says stop.

    A task's exception that is one of ``escaping`` ends the loop (see
    :func:`run_unit`): a worker thread or process passes ``()``, or the
    exception its own signal handler raises to stop it.
    """
    while _run_batch(source, codec, escaping):
        pass


def _run_batch(source: WorkSource, codec: Codec, escaping: ExceptionTypes) -> bool:
    """Take units from ``source`` and run them; False if there were none (stop).

    A function of its own so that, once it returns, nothing of the units it ran
    (their tasks, a closure's class and what it holds) stays alive in the worker
    while it waits for the next.
    """
    assignments = source.take()
    if not assignments:
        return False
    # Iterate over the very list take() returned: a source may shorten it from
    # finish() to hand back the units not started yet (the remote worker does).
    for assignment in assignments:
        if source.start(assignment):
            source.finish(assignment, run_unit(assignment.payload, codec, escaping=escaping))
    return True
