"""The dummy backend: every task runs in the calling thread. For debugging.

Pending units run inline whenever the caller pushes or waits for a result,
in FIFO order, so a run is deterministic and a debugger or a print in a
task behaves as in plain sequential code. Bounds, cancellation and the
rest of the contract hold as on every other backend.

Whatever a task raises is its outcome, SystemExit and GeneratorExit
included, as on the thread backend: ``sys.exit()`` in a task does not end
the caller. KeyboardInterrupt is the exception: raised by a task or by
Ctrl-C, which cannot be told apart here, it reaches the caller at once, and
the interrupted task goes back to run again on the next push or pop.
"""

from __future__ import annotations

from papyros.dispatcher import QueueLink
from papyros.dispatchers._local import CoreDispatcher, CoreQueueLink
from papyros.errors import ClosedTaskDispatcherError
from papyros.scheduler import Scheduler
from papyros.task import Encoded, Results
from papyros.worker import Codec, InProcessCodec, run_unit

__all__ = ["DummyTaskDispatcher"]

# The worker identity of whichever thread runs units inline.
_INLINE = "inline"


class _InlineLink(CoreQueueLink):
    """A queue that runs pending units itself instead of waiting for a worker."""

    def __init__(self, scheduler: Scheduler, queue_id: int, codec: Codec) -> None:
        super().__init__(scheduler, queue_id, codec)

    def send(self, units: list[Encoded], deadline: float | None) -> list[int]:
        while True:
            try:
                # Only wait if running pending work inline cannot make room.
                return super().send(units, 0.0)
            except TimeoutError:
                if not self._run_one():
                    return super().send(units, deadline)

    def receive(self, deadline: float | None) -> list[tuple[int, Results]]:
        # One unit at a time, until one of this queue's finishes: what is still pending
        # then can be cancelled by closing the queue, as on every backend.
        received = super().receive(0.0)
        while not received and self._run_one():
            received = super().receive(0.0)
        return received or super().receive(deadline)

    def _run_one(self) -> bool:
        """Run the next assignable pending unit here; False if there was none."""
        scheduler = self._scheduler
        try:
            assignments = scheduler.assign(_INLINE, 1, 0.0)
        except ClosedTaskDispatcherError:
            return False
        for assignment in assignments:
            try:
                # A KeyboardInterrupt here is Ctrl-C, or as good as: it is the caller's
                # at once, not an outcome to pop later.
                outcome = run_unit(assignment.payload, self._codec, escaping=KeyboardInterrupt)
            except KeyboardInterrupt:
                # The unit did not finish: it goes back, to run again if asked.
                scheduler.give_back(_INLINE, [assignment.unit_id])
                raise
            scheduler.complete(_INLINE, assignment.unit_id, assignment.attempt, outcome)
        return bool(assignments)


class DummyTaskDispatcher(CoreDispatcher):
    """Runs each task in the calling thread, in order. For debugging.

    Args:
        size: see :class:`~papyros.TaskDispatcher`.
    """

    backend_name = "dummy"

    def __init__(self, size: int = 0) -> None:
        super().__init__(size, codec=InProcessCodec())

    def _open_link(self, size: int) -> QueueLink:
        return _InlineLink(self._scheduler, self._scheduler.open_queue(size), self._codec)
