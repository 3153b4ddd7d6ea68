"""The dispatcher process: the scheduling core behind a Pyro5 daemon.

::

    clients (their own threads,        dispatcher process                 workers (anywhere)
    one connection each)               ──────────────────                 ──────────────────
    submit(units: bytes) ──────────▶   DispatcherService ─▶ Scheduler     exchange(results, want)
    fetch (long-poll)  ◀── outcomes ─  (one Pyro5 thread    ◀──────────── long-poll: returns
                                        per connection)     ──── units ─▶ the next units
                                       lease keeper thread: worker_lost() for workers that
                                       went silent; clientDisconnect: for dropped ones

Payloads and outcomes are opaque bytes here: the dispatcher never unpickles
anything, and the wire serializer (marshal) carries only plain data, so a
hostile client cannot make the dispatcher run code. Every connection must
pass the two-way challenge/response of :mod:`papyros._auth` before any
method does anything.
"""

from __future__ import annotations

import builtins
import logging
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import Pyro5.api
import Pyro5.core
import Pyro5.errors
import Pyro5.server

from papyros import _auth
from papyros.errors import (
    ClosedTaskDispatcherError,
    ClosedTaskQueueError,
    CommunicationError,
    WorkerLostError,
)
from papyros.errors import TimeoutError as PapyrosTimeoutError
from papyros.pyro._common import (
    CALL_BYTES,
    LONG_POLL,
    dispatcher_name,
    locate_ns,
    log,
    use_fast_connection,
)
from papyros.scheduler import Scheduler, payload_size

__all__ = ["DispatcherDaemon", "DispatcherService"]

# The longest a lost worker's silence may last before its units are re-dispatched.
DEFAULT_LEASE = 10.0

# The most units a worker gets in one exchange.
_MAX_UNITS_PER_WORKER = 256

# Seconds to wait for a connection to the address of another dispatcher of the group.
_PROBE_TIMEOUT = 2.0


class _WorkerRecord:
    """What the dispatcher knows of one registered worker."""

    __slots__ = ("host", "last_seen", "pid", "registered", "tasks_done", "units_done")

    def __init__(self, host: str, pid: int) -> None:
        self.host = host
        self.pid = pid
        self.registered = time.monotonic()
        self.last_seen = self.registered
        self.units_done = 0
        self.tasks_done = 0


class _Sent:
    """A queue's finished units sent to its client and not known to have arrived yet."""

    __slots__ = ("entries", "received")

    def __init__(self) -> None:
        self.entries: deque[list[Any]] = deque()
        # How many of the queue's finished units the client said it had, in all: the
        # place of the first of ``entries`` in everything ever sent from this queue.
        self.received = 0

    def acknowledge(self, received: int) -> None:
        """The client has received ``received`` of the queue's finished units in all."""
        arrived = max(0, min(received - self.received, len(self.entries)))
        for _ in range(arrived):
            self.entries.popleft()
        self.received += arrived

    def reply(self) -> list[list[Any]]:
        """The oldest units not acknowledged: at least one, and about CALL_BYTES at most."""
        taken: list[list[Any]] = []
        size = 0
        for entry in self.entries:
            size += payload_size(entry[2])
            if taken and size > CALL_BYTES:
                break
            taken.append(entry)
        return taken


def _peer(kind: str | None = None) -> dict[str, Any]:
    """The authenticated peer of the current call; refuse the call otherwise."""
    conn = Pyro5.api.current_context.client
    peer = getattr(conn, "papyros_peer", None)
    if peer is None:
        raise PermissionError("not authenticated: prove the shared secret first")
    if kind is not None and peer["role"] != kind:
        raise PermissionError(f"this call is for {kind}s, not {peer['role']}s")
    return peer  # type: ignore[no-any-return]


@Pyro5.api.expose
class DispatcherService:
    """The methods a dispatcher offers its clients and workers, over Pyro5.

    Only plain data crosses: ints, floats, strings, bytes, lists, dicts.
    Failures are builtin exceptions, translated by the client:
    ``PermissionError`` (not authenticated), ``LookupError`` (a queue or
    worker the dispatcher does not know), ``TimeoutError`` (still full),
    ``RuntimeError`` (closed).
    """

    def __init__(self, scheduler: Scheduler, secret: bytes, lease: float) -> None:
        self._scheduler = scheduler
        self._secret = secret
        self._lease = lease
        # Identifies this run of the dispatcher: queues and workers of an earlier run are unknown.
        self.incarnation = secrets.token_hex(8)
        # Protects _workers, _sessions and _stats.
        self._lock = threading.Lock()
        self._workers: dict[str, _WorkerRecord] = {}
        # Open queues of each client session, closed when its last connection drops.
        self._sessions: dict[str, set[int]] = {}
        self._session_connections: dict[str, int] = {}
        # Of each queue, the finished units sent to its client and not acknowledged yet.
        self._unacknowledged: dict[int, _Sent] = {}
        self._started = time.monotonic()
        self._tasks_done = 0

    # -- authentication

    def authenticate(self, proof: bytes, role: str, session: str) -> list[Any]:
        """Check a peer's proof of the secret; return this dispatcher's incarnation and
        message cap."""
        conn = Pyro5.api.current_context.client
        nonces = getattr(conn, "papyros_nonces", None)
        if nonces is None or role not in ("client", "worker"):
            raise PermissionError("no handshake for this connection")
        client_nonce, dispatcher_nonce = nonces
        try:
            _auth.verify(self._secret, _auth.PEER, proof, dispatcher_nonce, client_nonce)
        except Exception:
            log.warning("refused a %s from %s: wrong secret", role, _address(conn))
            raise PermissionError("wrong secret") from None
        conn.papyros_peer = {"role": role, "session": session, "worker": None}
        if role == "client" and session:
            with self._lock:
                self._session_connections[session] = self._session_connections.get(session, 0) + 1
        log.debug("authenticated a %s from %s", role, _address(conn))
        return [self.incarnation, Pyro5.api.config.MAX_MESSAGE_SIZE]

    # -- clients

    def open_queue(self, size: int) -> list[Any]:
        """Open a queue; its id, with the incarnation that it belongs to."""
        peer = _peer("client")
        queue_id = self._call(self._scheduler.open_queue, size)
        with self._lock:
            self._sessions.setdefault(peer["session"], set()).add(queue_id)
            self._unacknowledged[queue_id] = _Sent()
        return [self.incarnation, queue_id]

    def close_queues(self, incarnation: str, queue_ids: list[int]) -> None:
        peer = _peer("client")
        if incarnation != self.incarnation:
            return  # Queues of an earlier run are gone already.
        with self._lock:
            owned = self._sessions.get(peer["session"], set())
            mine = [queue_id for queue_id in queue_ids if queue_id in owned]
            owned.difference_update(mine)
        self._close(mine)

    def submit(self, incarnation: str, queue_id: int, units: list[Any], wait: float) -> list[int]:
        self._check_owner(_peer("client"), incarnation, queue_id)
        checked = []
        for unit in units:
            payload, ntasks = unit
            if not _is_payload(payload) or not isinstance(ntasks, int) or ntasks < 1:
                raise ValueError("a unit is (payload bytes, number of tasks >= 1)")
            checked.append((payload, ntasks))
        deadline = time.monotonic() + max(0.0, min(float(wait), LONG_POLL))
        return self._call(self._scheduler.submit, queue_id, checked, deadline)  # type: ignore[no-any-return]

    def fetch(self, incarnation: str, queue_id: int, wait: float, received: int) -> list[Any]:
        """Finished units of a queue, waiting up to ``wait`` seconds for one.

        ``received`` is how many finished units the client has received from this
        queue so far. Sent units stay here until a later call says they arrived: a
        reply that never reached its client (its call was interrupted, or its
        connection lost) is sent again by the next call, at once, so that no outcome
        is lost, and none arrives twice.
        """
        self._check_owner(_peer("client"), incarnation, queue_id)
        with self._lock:
            sent = self._sent(queue_id)
            sent.acknowledge(int(received))
            if sent.entries:  # Sent, and lost on the way: again, before anything new.
                return sent.reply()
        deadline = time.monotonic() + max(0.0, min(float(wait), LONG_POLL))
        entries = self._call(self._scheduler.fetch, queue_id, deadline, max_bytes=CALL_BYTES)
        fetched = []
        for entry in entries:
            error = None
            if isinstance(entry.error, WorkerLostError):
                lost = entry.error
                error = [str(lost), str(lost.worker), lost.exitcode, lost.attempts]
            fetched.append([entry.unit_id, entry.ntasks, entry.outcome, error])
        with self._lock:
            # Another call on the queue may have gone on meanwhile: the client's count
            # covers only what it had received, so this one sends from the oldest
            # unacknowledged unit, those of an interrupted call included.
            sent = self._sent(queue_id)
            sent.entries.extend(fetched)
            return sent.reply()

    def num_queues(self) -> int:
        _peer()
        return self._scheduler.num_queues()

    def num_tasks(self) -> int:
        _peer()
        return self._scheduler.num_tasks()

    def get_stats(self) -> dict[str, Any]:
        _peer()
        return self._stats()

    def _stats(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            workers = [
                {
                    "id": worker_id,
                    "host": record.host,
                    "pid": record.pid,
                    "tasks_done": record.tasks_done,
                    "busy": bool(self._scheduler.held_by(worker_id)),
                    "idle_for": round(now - record.last_seen, 3),
                }
                for worker_id, record in self._workers.items()
            ]
            tasks_done = self._tasks_done
        uptime = max(now - self._started, 1e-9)
        return {
            "incarnation": self.incarnation,
            "uptime": round(uptime, 3),
            "workers": workers,
            "queues": self._scheduler.num_queues(),
            "pending_tasks": self._scheduler.num_tasks(),
            "inflight_units": self._scheduler.num_inflight(),
            "tasks_done": tasks_done,
            "tasks_per_second": round(tasks_done / uptime, 3),
        }

    # -- workers

    def register_worker(self, host: str, pid: int) -> str:
        peer = _peer("worker")
        worker_id = f"{host}:{pid}:{secrets.token_hex(4)}"
        with self._lock:
            self._workers[worker_id] = _WorkerRecord(str(host), int(pid))
        peer["worker"] = worker_id
        log.info("worker %s joined", worker_id)
        return worker_id

    def exchange(
        self,
        worker_id: str,
        results: list[Any],
        want: int,
        wait: float,
        returned: list[int] | None = None,
    ) -> list[Any]:
        """Hand back finished units (and ``returned``, units not started), then wait up
        to ``wait`` seconds for the next ones.

        Returns:
            The next units, and the ids of units the worker holds that it need
            not start: their queue was closed since it took them.
        """
        _peer("worker")
        record = self._touch(worker_id)
        scheduler = self._scheduler
        if returned:
            scheduler.give_back(worker_id, [int(unit_id) for unit_id in returned])
        for unit_id, attempt, outcome, ntasks in results:
            if scheduler.complete(worker_id, unit_id, attempt, outcome):
                record.units_done += 1
                record.tasks_done += ntasks
                with self._lock:
                    self._tasks_done += ntasks
        cancelled = scheduler.abandoned(worker_id)
        if want <= 0:
            return [[], cancelled]
        deadline = time.monotonic() + max(0.0, min(float(wait), LONG_POLL))
        try:
            assignments = scheduler.assign(
                worker_id,
                min(int(want), _MAX_UNITS_PER_WORKER),
                deadline,
                share=max(1, len(self._workers)),
                max_bytes=CALL_BYTES,
            )
        except ClosedTaskDispatcherError:
            raise RuntimeError("the dispatcher is shutting down") from None
        try:
            self._touch(worker_id)
        except LookupError:
            # Its lease expired while it waited here (it was stopped, say): what it was
            # just handed would be lost with the reply it is refused. Back it goes.
            scheduler.worker_lost(worker_id, blame_running=False)
            raise
        return [[[a.unit_id, a.attempt, a.payload, a.ntasks] for a in assignments], cancelled]

    def heartbeat(self, worker_id: str) -> None:
        _peer("worker")
        self._touch(worker_id)

    def unregister_worker(self, worker_id: str) -> None:
        _peer("worker")
        self._lose_worker(worker_id, "stopped")

    # -- called by the daemon and the lease keeper; private, so never exposed

    def _lose_worker(self, worker_id: str, reason: str) -> None:
        with self._lock:
            record = self._workers.pop(worker_id, None)
        if record is None:
            return
        retried = self._scheduler.worker_lost(worker_id, reason=reason)
        level = logging.INFO if reason == "stopped" else logging.WARNING
        log.log(
            level,
            "worker %s %s; %d of its units were dispatched again",
            worker_id,
            reason,
            len(retried),
        )

    def _expire_leases(self) -> None:
        limit = time.monotonic() - self._lease
        with self._lock:
            silent = [wid for wid, record in self._workers.items() if record.last_seen < limit]
        for worker_id in silent:
            self._lose_worker(worker_id, f"was silent for more than {self._lease:g} s")

    def _client_disconnected(self, conn: Any) -> None:
        peer = getattr(conn, "papyros_peer", None)
        if peer is None:
            return
        if peer["role"] == "worker" and peer["worker"]:
            self._lose_worker(peer["worker"], "lost its connection")
        elif peer["role"] == "client" and peer["session"]:
            session = peer["session"]
            with self._lock:
                count = self._session_connections.get(session, 1) - 1
                if count > 0:
                    self._session_connections[session] = count
                    return
                self._session_connections.pop(session, None)
                orphans = self._sessions.pop(session, set())
            self._close(orphans)
            if orphans:
                log.info("closed %d queues of a client that went away", len(orphans))

    # -- internals

    def _sent(self, queue_id: int) -> _Sent:
        """What was sent from an open queue and not acknowledged (call with the lock held)."""
        sent = self._unacknowledged.get(queue_id)
        if sent is None:  # Closed since the caller checked.
            raise LookupError("the task queue is closed")
        return sent

    def _close(self, queue_ids: Iterable[int]) -> None:
        for queue_id in queue_ids:
            with self._lock:
                self._unacknowledged.pop(queue_id, None)
            self._scheduler.close_queue(queue_id)

    def _touch(self, worker_id: str) -> _WorkerRecord:
        with self._lock:
            record = self._workers.get(worker_id)
            if record is None:
                raise LookupError(f"unknown worker {worker_id}: register again")
            record.last_seen = time.monotonic()
            return record

    def _check_owner(self, peer: dict[str, Any], incarnation: str, queue_id: int) -> None:
        """Refuse a call on a queue of an earlier run, or of another client."""
        self._check_incarnation(incarnation)
        with self._lock:
            if queue_id not in self._sessions.get(peer["session"], ()):
                raise LookupError("the task queue is closed")

    def _check_incarnation(self, incarnation: str) -> None:
        if incarnation != self.incarnation:
            raise LookupError(
                "the dispatcher was restarted and lost this queue; its tasks must be pushed again"
            )

    def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except ClosedTaskQueueError as exc:
            raise LookupError(str(exc)) from None
        except ClosedTaskDispatcherError as exc:
            raise RuntimeError(str(exc)) from None
        except PapyrosTimeoutError as exc:
            raise builtins.TimeoutError(str(exc)) from None


def _is_payload(payload: Any) -> bool:
    """Whether a unit's payload is what clients send: bytes, or a tuple of bytes (pieces)."""
    if isinstance(payload, tuple):
        return bool(payload) and all(type(piece) is bytes for piece in payload)
    return isinstance(payload, bytes)


def _address(conn: Any) -> str:
    try:
        host, port = conn.sock.getpeername()[:2]
        return f"{host}:{port}"
    except (OSError, AttributeError, ValueError):
        return "an unknown address"


class DispatcherDaemon(Pyro5.server.Daemon):  # type: ignore[misc]
    """A Pyro5 daemon that proves the secret in every handshake and tracks disconnects."""

    def __init__(self, service: DispatcherService, secret: bytes, host: str, port: int) -> None:
        super().__init__(host=host, port=port)
        self._service = service
        self._secret = secret

    def _handshake(self, conn: Any, denied_reason: str | None = None) -> bool:
        use_fast_connection(conn)
        accepted: bool = super()._handshake(conn, denied_reason)
        if not accepted and not getattr(conn, "papyros_refusal_logged", False):
            log.warning(
                "refused a connection from %s: not a valid papyros handshake "
                "(garbage, an oversized message, or another protocol)",
                _address(conn),
            )
        return accepted

    def validateHandshake(self, conn: Any, data: Any) -> Any:
        nonce = data.get("nonce") if isinstance(data, dict) else None
        if not isinstance(nonce, bytes) or len(nonce) < 16:
            log.warning("refused a connection from %s: no papyros handshake", _address(conn))
            conn.papyros_refusal_logged = True
            raise PermissionError("a papyros handshake is required")
        own = _auth.new_nonce()
        conn.papyros_nonces = (nonce, own)
        return {"nonce": own, "proof": _auth.prove(self._secret, _auth.DISPATCHER, nonce, own)}

    def clientDisconnect(self, conn: Any) -> None:
        try:
            self._service._client_disconnected(conn)
        except Exception:  # Never let bookkeeping break the daemon.
            log.exception("error while handling a disconnect")


def register_in_name_server(uri: str, group: str, ns_host: str, ns_port: int) -> None:
    """Register the dispatcher of ``group`` under its name, replacing an entry left by one
    that is gone.

    Raises:
        CommunicationError: a dispatcher of the group still listens where its entry says.
    """
    name = dispatcher_name(group)
    with locate_ns(ns_host, ns_port) as ns:
        try:
            current = str(ns.lookup(name))
        except Pyro5.errors.NamingError:
            current = ""
        if current and current != uri and _listening(current):
            raise CommunicationError(
                f"a dispatcher of group {group!r} is running already, at {current}; "
                "stop it first, or choose another --group"
            )
        ns.register(name, uri)


def _listening(uri: str) -> bool:
    """Whether something accepts connections at the address of ``uri``."""
    location = Pyro5.core.URI(uri)
    try:
        if location.sockname:
            with socket.socket(socket.AF_UNIX) as unix:
                unix.settimeout(_PROBE_TIMEOUT)
                unix.connect(location.sockname)
        else:
            socket.create_connection((location.host, location.port), _PROBE_TIMEOUT).close()
    except OSError:
        return False
    return True


def unregister_from_name_server(uri: str, group: str, ns_host: str, ns_port: int) -> None:
    """Remove the group's entry, if it is still ours."""
    try:
        with locate_ns(ns_host, ns_port) as ns:
            name = dispatcher_name(group)
            if str(ns.lookup(name)) == uri:
                ns.remove(name)
    except Exception:  # The name server may be gone first; that is fine.
        log.debug("could not unregister from the name server", exc_info=True)
