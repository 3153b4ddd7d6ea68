"""A remote worker: finds its group's dispatcher, runs units from it, survives its restarts.

::

    worker process                                         dispatcher
    ──────────────                                         ──────────
    main thread: papyros.worker.work(RemoteSource)
      take():   exchange(finished outcomes, want=N) ─────▶  complete, then assign
                 ◀──────── the next units (long-poll) ────
      run the unit's tasks, encode their outcomes
    heartbeat thread: heartbeat() every lease/3 ─────────▶  keeps the lease while a task runs

    manager process (start-papyros workers), vouch_for():
      heartbeat() for each of its worker processes that ─▶  keeps the lease while a task
      runs (not stopped), every lease/3                      holds the GIL

The connection is authenticated both ways before anything the dispatcher
sends is unpickled. A unit the worker cannot unpickle (its task class is in a
module not installed here, say) is a SerializationError for each of its tasks,
not a fault of the worker: it stays connected. A worker that cannot reach its
dispatcher, or whose dispatcher restarts, retries with backoff and registers again.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from papyros._auth import load_secret
from papyros._deadline import check_duration
from papyros.errors import AuthenticationError, PapyrosError, SerializationError
from papyros.pyro._common import (
    CALL_BYTES,
    LONG_POLL,
    Peer,
    configure_pyro,
    keep_freed_buffers,
    locate_dispatcher,
    log,
    this_host,
)
from papyros.pyro.server import DEFAULT_LEASE
from papyros.scheduler import Assignment, payload_size
from papyros.serialization import Payload, PickleCodec
from papyros.task import Task, TaskBatch
from papyros.worker import WorkSource, work

__all__ = ["WorkerOptions", "run_worker", "worker_main"]

# How much work, in seconds, a worker asks for at a time; it asks for at least two
# units and at most _MAX_WANT. Each request is a round trip during which the worker
# is idle, and with every core busy running tasks it waits for the dispatcher to
# be scheduled too: on 2 busy cores, about 0.5 to 3 ms. A batch much slower than
# guessed hands its units not started back (see finish()).
_PREFETCH_SECONDS = 0.05
_MAX_WANT = 256

# Finished outcomes go back at once when a batch has run for this long.
_FLUSH_AFTER = 0.1

# The longest a stopping worker spends telling its dispatcher that it stops.
_GOODBYE_SLACK = 2.0

# Backoff between connection attempts, in seconds.
_FIRST_BACKOFF = 0.2
_MAX_BACKOFF = 10.0


class WorkerOptions:
    """How a worker finds and joins its dispatcher (picklable, for worker processes)."""

    def __init__(
        self,
        group: str = "default",
        *,
        uri: str = "",
        ns_host: str = "",
        ns_port: int = 0,
        secret_file: str | None = None,
        lease: float = DEFAULT_LEASE,
        tls_cert: str = "",
        tls_key: str = "",
        tls_ca: str = "",
        log_level: str = "",
        log_file: str = "",
    ) -> None:
        self.group = group
        self.uri = uri
        self.ns_host = ns_host
        self.ns_port = ns_port
        self.secret_file = secret_file
        self.lease = check_duration(lease, "lease")
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.tls_ca = tls_ca
        self.log_level = log_level
        self.log_file = log_file


class _RemoteSource(WorkSource):
    """Takes units from the dispatcher; hands outcomes back with the next request."""

    def __init__(self, peer: Peer, worker_id: str, stop: threading.Event) -> None:
        self._peer = peer
        self._worker_id = worker_id
        self._stop = stop
        self._results: list[list[Any]] = []
        self._results_bytes = 0
        self._batch_started = self._flushed_at = 0.0
        self._batch_size = 0
        # The batch being run, and how many of its units are not finished yet.
        self._batch: list[Assignment] = []
        self._batch_left = 0
        # A running estimate of one unit's time; it starts pessimistic (one unit ahead).
        self._unit_seconds = _PREFETCH_SECONDS
        # Units held whose queue was closed (the dispatcher says so in its replies), and
        # those skipped for it, to give back with the next request.
        self._cancelled: set[int] = set()
        self._skipped: list[int] = []

    def take(self) -> list[Assignment]:
        now = time.monotonic()
        if self._batch_size:
            # Learn how long a unit takes here, to ask for about _PREFETCH_SECONDS of them.
            per_unit = (now - self._batch_started) / self._batch_size
            self._unit_seconds = (self._unit_seconds + per_unit) / 2
        want = max(2, min(_MAX_WANT, int(_PREFETCH_SECONDS / max(self._unit_seconds, 1e-6))))
        self._cancelled.clear()  # Only ever about units of the batch that ended.
        while not self._stop.is_set():
            reply = self._exchange(want, LONG_POLL)
            if reply:
                self._batch_started = self._flushed_at = time.monotonic()
                self._batch_size = self._batch_left = len(reply)
                self._batch = [
                    Assignment(unit_id, attempt, payload, ntasks)
                    for unit_id, attempt, payload, ntasks in reply
                ]
                return self._batch
        self._exchange(0, 0.0)  # Hand back what is finished before stopping.
        return []

    def start(self, assignment: Assignment) -> bool:
        if assignment.unit_id not in self._cancelled:
            return True
        # Its queue was closed: skipped, as if done, and given back with the next request.
        self._skipped.append(assignment.unit_id)
        self._batch_left -= 1
        return False

    def finish(self, assignment: Assignment, outcome: Any) -> None:
        size = payload_size(outcome)
        if self._results and self._results_bytes + size > min(CALL_BYTES, self.largest_payload):
            # Together they would not fit in one message: what is done so far goes first.
            self._exchange(0, 0.0)
            self._flushed_at = time.monotonic()
        self._results.append([assignment.unit_id, assignment.attempt, outcome, assignment.ntasks])
        self._results_bytes += size
        self._batch_left -= 1
        if not self._batch_left:
            return  # take() hands them back with its request, in the same call.
        now = time.monotonic()
        # The batch's size was guessed from the last batch's pace. If it has run for longer
        # than a whole batch should, and what is left would take more than twice as long
        # again, keep about _PREFETCH_SECONDS of it and hand the rest back at once, for
        # idle workers to take instead of waiting for this one.
        elapsed = now - self._batch_started
        done = self._batch_size - self._batch_left
        keep = max(1, int(_PREFETCH_SECONDS * done / elapsed))
        if elapsed > _PREFETCH_SECONDS and self._batch_left > 2 * keep:
            start = done + keep
            returned = [assignment.unit_id for assignment in self._batch[start:]]
            del self._batch[start:]  # work() iterates over this very list: its batch ends early.
            self._batch_size = start
            self._batch_left = keep
            self._unit_seconds = max(self._unit_seconds, elapsed / done)
            self._exchange(0, 0.0, returned)
            self._flushed_at = now
        elif now - self._flushed_at > _FLUSH_AFTER or self._results_bytes >= CALL_BYTES:
            # A slow batch, or big outcomes: hand back what is done so far.
            self._exchange(0, 0.0)
            self._flushed_at = now

    @property
    def largest_payload(self) -> int:
        """The largest outcome that may travel back to the dispatcher."""
        return self._peer.largest_payload

    def current_ntasks(self) -> int:
        """The number of tasks of the unit being run."""
        return self._batch[self._batch_size - self._batch_left].ntasks

    def _exchange(self, want: int, wait: float, returned: list[int] | None = None) -> list[Any]:
        """Hand back outcomes (and units not started); the next units, if ``want``."""
        results, self._results = self._results, []
        self._results_bytes = 0
        if self._skipped:
            returned = [*self._skipped, *(returned or [])]
            self._skipped = []
        args: tuple[Any, ...] = (
            (results, want, wait, returned) if returned else (results, want, wait)
        )
        units, cancelled = self._peer.call("exchange", self._worker_id, *args, wait=wait)
        self._cancelled.update(cancelled)
        return units  # type: ignore[no-any-return]


class _RemoteCodec(PickleCodec):
    """The worker's codec: a unit that cannot be unpickled fails task by task, never the worker."""

    def __init__(self, source: _RemoteSource) -> None:
        # Outcomes may be tuples of pieces: a large result is pickled without a copy.
        super().__init__(pieces=True)
        self._source = source
        # The causes already logged: a run whose every unit fails the same way logs once.
        self._logged: set[str] = set()

    def decode_unit(self, payload: Payload) -> list[Task] | TaskBatch:
        try:
            return super().decode_unit(payload)
        except Exception as exc:
            cause = f"{type(exc).__name__}: {exc}"
            if cause not in self._logged:
                self._logged.add(cause)
                log.warning("could not unpickle a unit of tasks (%s); its tasks fail", cause)
            return self.unreadable_unit(exc, self._source.current_ntasks())

    def encode_results(self, values: list[Any], errors: dict[int, BaseException]) -> Any:
        encode = super().encode_results
        outcome = encode(values, errors)
        largest = self._source.largest_payload
        size = payload_size(outcome)
        if size <= largest:
            return outcome
        # They cannot reach the client together. The biggest results, one after the
        # other, become errors that say why, until the rest fit.
        sizes = {
            index: payload_size(encode([value], {}))
            for index, value in enumerate(values)
            if index not in errors
        }
        failed: dict[int, BaseException] = {}
        for index in sorted(sizes, key=sizes.__getitem__, reverse=True):
            if size <= largest:
                break
            failed[index] = SerializationError(
                f"the result of this task pickles to {sizes[index]:,} bytes; "
                + (
                    f"more than the {largest:,} a message to the dispatcher may carry"
                    if sizes[index] > largest
                    else f"with the rest of its unit's, more than the {largest:,} a message to "
                    "the dispatcher may carry (use fewer tasks per chunk)"
                )
                + "; return less data per task, or raise the dispatcher's --max-message-size"
            )
            size -= sizes[index]
        kept = [None if index in failed else value for index, value in enumerate(values)]
        outcome = encode(kept, {**failed, **errors})
        if payload_size(outcome) <= largest:
            return outcome
        # Still too big (the tasks' exceptions themselves, say): each task says why.
        failure = SerializationError(
            f"the results of a unit of {len(values)} task(s) pickle to more than the "
            f"{largest:,} bytes a message to the dispatcher may carry; return less data per "
            "task (or use fewer tasks per chunk), or raise the dispatcher's --max-message-size"
        )
        too_big: dict[int, BaseException] = {i: copy.copy(failure) for i in range(len(values))}
        outcome = encode([None] * len(values), {**too_big, **errors})
        if payload_size(outcome) <= largest:
            return outcome
        return encode([None] * len(values), too_big)


def _heartbeat(peer: Peer, worker_id: str, interval: float, stop: threading.Event) -> None:
    while not stop.wait(interval):
        try:
            peer.call("heartbeat", worker_id)
        except (PapyrosError, LookupError, RuntimeError):
            return  # The main loop finds out and reconnects.
    peer.close()


def run_worker(
    options: WorkerOptions, stop: threading.Event, report: Connection | None = None
) -> None:
    """Serve the group's dispatcher until ``stop`` is set, reconnecting whenever needed.

    ``report``, if given, receives this worker's id each time it registers, for
    the manager that vouches for it (see :func:`vouch_for`)."""
    configure_pyro(tls_cert=options.tls_cert, tls_key=options.tls_key, tls_ca=options.tls_ca)
    secret = load_secret(options.secret_file)
    backoff = _FIRST_BACKOFF
    while not stop.is_set():
        peer: Peer | None = None
        worker_id = ""
        beat_stop = threading.Event()
        beat: threading.Thread | None = None
        try:
            uri = options.uri or locate_dispatcher(options.group, options.ns_host, options.ns_port)
            peer = Peer(uri, secret, "worker")
            peer.connect()
            worker_id = str(peer.call("register_worker", this_host(), os.getpid()))
            log.info("worker %s joined the dispatcher at %s", worker_id, uri)
            if report is not None:
                with contextlib.suppress(OSError):
                    report.send(worker_id)
            backoff = _FIRST_BACKOFF
            beat_peer = Peer(uri, secret, "worker")
            beat = threading.Thread(
                target=_heartbeat,
                args=(beat_peer, worker_id, options.lease / 3, beat_stop),
                name="papyros-heartbeat",
                daemon=True,
            )
            beat.start()
            source = _RemoteSource(peer, worker_id, stop)
            # Whatever a task raises is its outcome, SystemExit included, as on the
            # other backends; only SIGTERM (_Terminated) stops the worker.
            work(source, _RemoteCodec(source), escaping=(_Terminated,))
        except _Terminated:
            stop.set()
            raise
        except AuthenticationError as exc:
            log.error("worker refused: %s; retrying in %.1f s", exc, backoff)
        except (PapyrosError, LookupError, RuntimeError) as exc:
            if not stop.is_set():
                log.warning("worker lost its dispatcher: %s; retrying in %.1f s", exc, backoff)
        except Exception:
            log.exception("worker failed unexpectedly; retrying in %.1f s", backoff)
        finally:
            beat_stop.set()
            if beat is not None and beat.ident is not None:  # A SIGTERM may stop its start.
                beat.join(LONG_POLL + 1)
            if peer is not None:
                if worker_id and stop.is_set():
                    _say_goodbye(peer, worker_id)
                peer.close()
        if stop.wait(backoff):
            break
        backoff = min(backoff * 2, _MAX_BACKOFF)


def _say_goodbye(peer: Peer, worker_id: str) -> None:
    """Tell the dispatcher that this worker stops, so that it logs a stop, not a loss.

    Best effort, and brief: its units go back to the dispatcher's queue either way."""
    peer.slack = _GOODBYE_SLACK
    try:
        peer.call("unregister_worker", worker_id)
    except (PapyrosError, LookupError, RuntimeError) as exc:
        log.debug("could not tell the dispatcher that worker %s stops: %s", worker_id, exc)


def vouch_for(options: WorkerOptions, workers: dict[int, str], stop: threading.Event) -> None:
    """Keep the leases of local worker processes that run, from another process.

    A task that holds the GIL (a long call into C code) also stops its
    worker's heartbeat thread; its dispatcher would take it for dead and run
    its units again elsewhere. So the manager of the worker processes, which
    runs no task, renews the lease of each one whose process is running
    (``workers``: process id to worker id), every third of a lease. It does
    not vouch for a process that is stopped (SIGSTOP) or gone, nor anywhere
    it cannot tell (outside Linux): those leases still expire.
    """
    if not sys.platform.startswith("linux"):
        return
    configure_pyro(tls_cert=options.tls_cert, tls_key=options.tls_key, tls_ca=options.tls_ca)
    secret = load_secret(options.secret_file)
    peer: Peer | None = None
    while not stop.wait(options.lease / 3):
        for pid, worker_id in list(workers.items()):
            if not _running(pid):
                continue
            try:
                if peer is None:
                    uri = options.uri or locate_dispatcher(
                        options.group, options.ns_host, options.ns_port
                    )
                    peer = Peer(uri, secret, "worker")
                peer.call("heartbeat", worker_id)
            except LookupError:
                pass  # It re-registers under a new id, which it reports.
            except (PapyrosError, RuntimeError):
                if peer is not None:
                    peer.close()
                peer = None  # Try again at the next round.
                break
    if peer is not None:
        peer.close()


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is neither stopped nor a zombie (Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            state = file.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state in (b"R", b"S", b"D")


def worker_main(options: WorkerOptions, report: Connection | None = None) -> None:
    """The entry point of a worker process started by ``start-papyros workers``."""
    from papyros.cli._logging import setup_logging

    setup_logging(options.log_level, options.log_file)
    keep_freed_buffers()
    # Ctrl-C goes to the whole process group: the manager decides, workers ignore it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _terminate)
    with contextlib.suppress(_Terminated):
        run_worker(options, threading.Event(), report)


class _Terminated(BaseException):
    """SIGTERM arrived: raised in the main thread, wherever it is, to stop the worker.

    Not a SystemExit, which a task may raise: that one is the task's outcome.
    """


def _terminate(signum: int, frame: Any) -> None:
    # The first SIGTERM stops the worker; more may follow (one sent to the whole process
    # group, then the manager's own): raised while the worker exits, they would break
    # its clean-up. So the worker ignores them from now on.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Terminated
