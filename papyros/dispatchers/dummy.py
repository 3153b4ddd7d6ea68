"""The dummy backend: every task runs in the calling thread. For debugging.

Pending units run inline whenever the caller pushes or waits for a result,
in FIFO order, so a run is deterministic and a debugger or a print in a
task behaves as in plain sequential code. Bounds, cancellation and the
rest of the contract hold as on every other backend.
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
                if not self._run_pending():
                    return super().send(units, deadline)

    def receive(self, deadline: float | None) -> list[tuple[int, Results]]:
        received = super().receive(0.0)
        while not received and self._run_pending():
            received = super().receive(0.0)
        return received or super().receive(deadline)

    def _run_pending(self) -> bool:
        """Run every assignable pending unit here; False if there was none."""
        scheduler = self._scheduler
        ran = False
        try:
            while assignments := scheduler.assign(_INLINE, 1, 0.0):
                for assignment in assignments:
                    outcome = run_unit(assignment.payload, self._codec)
                    scheduler.complete(_INLINE, assignment.unit_id, assignment.attempt, outcome)
                ran = True
        except ClosedTaskDispatcherError:
            pass
        return ran


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
