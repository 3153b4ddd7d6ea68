"""The thread backend: workers are threads of this process.

::

    client thread(s)                 Scheduler (shared, locked)        worker threads 1..N
    ───────────────                  ──────────────────────────        ───────────────────
    queue.push / execute ──units──▶  pending FIFOs  ──assign(batch)──▶  run tasks
    queue.pop            ◀─outcomes─ finished buffers ◀──complete────  (in this memory)

Tasks and outcomes are passed as objects, never serialized. Idle workers
block on the scheduler's condition; nothing polls or sleeps. Threads suit
tasks that release the GIL (I/O, NumPy, compiled code); for pure-Python CPU
work use the process backend.
"""

from __future__ import annotations

import threading

from papyros.config import Config
from papyros.dispatchers._local import CoreDispatcher, CoreWorkSource, resolve_workers
from papyros.worker import InProcessCodec, work

__all__ = ["MultiThreadedTaskDispatcher"]

# The most units a worker thread takes at once; fewer when little is pending. Those
# whose queue closes before they start are skipped (see CoreWorkSource.start).
_MAX_BATCH = 16


class MultiThreadedTaskDispatcher(CoreDispatcher):
    """Runs tasks on a pool of threads in this process.

    Args:
        num_workers: the number of worker threads; 0 means one per CPU.
        size: see :class:`~papyros.TaskDispatcher`.

    ``close()`` cancels pending tasks and waits for running ones to finish
    (a thread cannot be killed); worker threads are daemons, so a task that
    never ends cannot keep the interpreter from exiting.

    Whatever a task raises, SystemExit and KeyboardInterrupt included, is its
    outcome: nothing a task does ends a worker thread.
    """

    backend_name = "thread"

    def __init__(self, num_workers: int = 0, size: int = 0) -> None:
        super().__init__(size, codec=InProcessCodec())
        self.num_workers = resolve_workers(num_workers)
        self._threads = [
            threading.Thread(
                target=work,
                args=(
                    CoreWorkSource(self._scheduler, index, _MAX_BATCH, self.num_workers),
                    self._codec,
                ),
                # Whatever a task raises is its outcome: nothing may end a worker thread.
                kwargs={"escaping": ()},
                name=f"papyros-worker-{index}",
                daemon=True,
            )
            for index in range(self.num_workers)
        ]
        for thread in self._threads:
            thread.start()

    @classmethod
    def from_config(cls, config: Config) -> MultiThreadedTaskDispatcher:
        return cls(num_workers=config.workers, size=config.size)

    def _execute_window(self) -> int:
        return max(64, 8 * self.num_workers)

    def _stop_workers(self) -> None:
        current = threading.current_thread()
        for thread in self._threads:
            if thread is not current:
                thread.join()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.num_workers} workers, {self._state.value}>"
