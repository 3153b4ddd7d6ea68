"""The distributed dispatcher (served by ``start-papyros dispatcher``) and its client proxy.

::

    client process                          dispatcher process              worker processes
    ──────────────                          ──────────────────              ────────────────
    PyroDispatcherProxy                     PyroTaskDispatcher
      TaskQueue ─ RemoteQueueLink            Scheduler + DispatcherService
        encode units once (pickle)
        submit(units as bytes) ──────────▶   pending FIFOs ◀─ exchange ───  decode, run, encode
        fetch (long-poll) ◀──────────────    finished buffers ─ units ───▶  (papyros.worker.work)
      one authenticated connection per client thread

A client thread's calls go through its own connection (Pyro5 proxies belong
to one thread). Queues that a finalizer closes are closed at the client's
next call, never from the finalizer itself.
"""

from __future__ import annotations

import builtins
import copy
import secrets
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator
from typing import Any

from papyros._auth import load_secret
from papyros._deadline import LONGEST_WAIT, check_duration
from papyros.config import Config
from papyros.dispatcher import QueueLink, TaskDispatcher
from papyros.dispatchers._local import CoreDispatcher
from papyros.errors import (
    ClosedTaskDispatcherError,
    ClosedTaskQueueError,
    CommunicationError,
    PapyrosError,
    SerializationError,
    TimeoutError,
    WorkerLostError,
)
from papyros.pyro._common import (
    CALL_BYTES,
    LONG_POLL,
    Peer,
    configure_pyro,
    locate_dispatcher,
    log,
    name_server_address,
)
from papyros.pyro.server import (
    DEFAULT_LEASE,
    DispatcherDaemon,
    DispatcherService,
    register_in_name_server,
    unregister_from_name_server,
)
from papyros.scheduler import payload_size
from papyros.serialization import PickleCodec
from papyros.task import Encoded, Results, Unit

__all__ = ["PyroDispatcherProxy", "PyroTaskDispatcher"]


class PyroTaskDispatcher(CoreDispatcher):
    """A dispatcher whose workers connect to it over the network.

    Usually run by ``start-papyros dispatcher``; clients reach it with
    :meth:`get_proxy`. It is also a full dispatcher in its own process.

    Args:
        size: see :class:`~papyros.TaskDispatcher`.
        group: the group name; the dispatcher registers in the Pyro5 name
            server under a name derived from it, and its workers find it so.
        host, port: where to listen (default 127.0.0.1 and a free port).
        ns_host, ns_port: the name server (default: Pyro5's own settings,
            ``PYRO_NS_HOST`` / ``PYRO_NS_PORT``).
        register: whether to register in the name server.
        secret_file: where the shared secret is (see :mod:`papyros._auth`).
        lease: seconds of silence after which a worker is presumed dead.
        max_attempts: dispatches of a unit before a lost worker is its outcome.
        max_message_size: the cap on one message, in bytes.
        tls_cert, tls_key, tls_ca: PEM files for TLS (Pyro5's SSL support).

    Raises:
        CommunicationError: the address is in use, the name server is unreachable, or
            a dispatcher of the group is running already.
    """

    backend_name = "pyro"

    def __init__(
        self,
        size: int = 0,
        *,
        group: str = "default",
        host: str = "127.0.0.1",
        port: int = 0,
        ns_host: str = "",
        ns_port: int = 0,
        register: bool = True,
        secret_file: str | None = None,
        lease: float = DEFAULT_LEASE,
        max_attempts: int = 3,
        max_message_size: int = 0,
        tls_cert: str = "",
        tls_key: str = "",
        tls_ca: str = "",
    ) -> None:
        lease = check_duration(lease, "lease")
        secret = load_secret(secret_file)
        configure_pyro(
            server=True,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_ca=tls_ca,
            **({"max_message_size": max_message_size} if max_message_size else {}),
        )
        super().__init__(size, codec=PickleCodec(), max_attempts=max_attempts)
        self.group = group
        self._ns = (ns_host, ns_port)
        self._service = DispatcherService(self._scheduler, secret, lease)
        try:
            self._daemon = DispatcherDaemon(self._service, secret, host, port)
        except OSError as exc:
            self._scheduler.close()
            raise CommunicationError(f"cannot listen on {host}:{port}: {exc}") from exc
        self.uri = str(self._daemon.register(self._service, "papyros.dispatcher"))
        self._registered = False
        if register:
            try:
                register_in_name_server(self.uri, group, ns_host, ns_port)
            except CommunicationError:  # Another dispatcher of the group is running.
                self._daemon.close()
                self._scheduler.close()
                raise
            except Exception as exc:
                self._daemon.close()
                self._scheduler.close()
                where = name_server_address(ns_host, ns_port)
                raise CommunicationError(
                    f"cannot register in the Pyro5 name server at {where}: {exc}; start one "
                    "with 'start-papyros nameserver' or pass --ns-host/--ns-port"
                ) from exc
            self._registered = True
        # Set when the dispatcher stops: ends the lease keeper and serve_forever().
        self._stopped = threading.Event()
        self._loop = threading.Thread(
            target=self._daemon.requestLoop, name="papyros-dispatcher-daemon", daemon=True
        )
        self._keeper = threading.Thread(
            target=self._keep_leases, args=(lease,), name="papyros-lease-keeper", daemon=True
        )
        self._loop.start()
        self._keeper.start()
        log.info("dispatcher of group %r serving at %s", group, self.uri)

    @classmethod
    def get_proxy(
        cls,
        group: str | None = None,
        *,
        uri: str | None = None,
        ns_host: str = "",
        ns_port: int = 0,
        secret_file: str | None = None,
        tls_cert: str = "",
        tls_key: str = "",
        tls_ca: str = "",
    ) -> PyroDispatcherProxy:
        """Connect to the dispatcher of ``group`` (or at ``uri``) as a client.

        Raises:
            CommunicationError: the name server or the dispatcher is unreachable.
            AuthenticationError: either side failed to prove the shared secret.
        """
        configure_pyro(tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca)
        secret = load_secret(secret_file)
        if uri is None:
            uri = locate_dispatcher(group or "default", ns_host, ns_port)
        return PyroDispatcherProxy(uri, secret)

    @classmethod
    def from_config(cls, config: Config) -> TaskDispatcher:
        return cls.get_proxy(
            config.group,
            ns_host=config.ns_host,
            ns_port=config.ns_port,
            secret_file=config.secret_file or None,
            tls_cert=config.tls_cert,
            tls_key=config.tls_key,
            tls_ca=config.tls_ca,
        )

    def serve_forever(self) -> None:
        """Block until the dispatcher is closed (from another thread or a signal)."""
        while not self._stopped.wait(3600):
            pass

    def get_stats(self) -> dict[str, Any]:
        """Workers, queues, pending and in-flight counts, throughput."""
        return self._service._stats()

    def _keep_leases(self, lease: float) -> None:
        while not self._stopped.wait(lease / 4):
            self._service._expire_leases()

    def _stop_workers(self) -> None:
        self._stopped.set()
        if self._registered:
            unregister_from_name_server(self.uri, self.group, *self._ns)
        self._daemon.shutdown()
        self._loop.join(10)
        self._keeper.join(10)
        self._daemon.close()
        log.info("dispatcher of group %r stopped", self.group)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} group={self.group!r} at {self.uri}, {self._state.value}>"


class PyroDispatcherProxy(TaskDispatcher):
    """A client's handle on a remote dispatcher, with the full dispatcher contract.

    Made by :meth:`PyroTaskDispatcher.get_proxy`. Usable from several threads
    (each gets its own connection). ``close()`` closes this client's queues
    and connections; the remote dispatcher keeps serving others.
    """

    backend_name = "pyro"

    def __init__(self, uri: str, secret: bytes) -> None:
        super().__init__(0)
        self.uri = uri
        self._secret = secret
        # Payloads may be tuples of pieces: a large buffer is pickled without a copy.
        self._codec = PickleCodec(pieces=True)
        # Identifies this client to the dispatcher, which closes its queues if it vanishes.
        self._session = secrets.token_hex(8)
        # Each thread's connection.
        self._local = threading.local()
        # Every connection, for close(); weak, so a finished thread's goes away with it.
        self._peers: weakref.WeakSet[Peer] = weakref.WeakSet()
        # Protects _peers and _links.
        self._lock = threading.Lock()
        self._links: weakref.WeakSet[RemoteQueueLink] = weakref.WeakSet()
        # Queues closed by finalizers, to close remotely at the next call.
        self._doomed: deque[tuple[str, int]] = deque()
        # The dispatcher closes a client's queues when its last connection drops: this
        # one, made now (to fail fast), and used for nothing else, lasts as long as the
        # client, whatever becomes of the connections of its threads (one that ends
        # takes its own, and a call that Ctrl-C interrupts drops its own).
        self._anchor = Peer(uri, secret, "client", self._session)
        self._anchor.connect()
        self.incarnation = self._anchor.incarnation

    def get_stats(self) -> dict[str, Any]:
        """The dispatcher's workers, queues, pending and in-flight counts, throughput."""
        return self._call("get_stats")  # type: ignore[no-any-return]

    def num_queues(self) -> int:
        self._check_open()
        return int(self._call("num_queues"))

    def num_tasks(self) -> int:
        self._check_open()
        return int(self._call("num_tasks"))

    def _open_link(self, size: int) -> QueueLink:
        # The dispatcher says which run of it the queue belongs to: a connection made
        # again after a restart knows it only once the call has made it.
        incarnation, queue_id = self._call("open_queue", size)
        link = RemoteQueueLink(self, str(incarnation), int(queue_id))
        with self._lock:
            self._links.add(link)
        return link

    def _execute_window(self) -> int:
        return 512

    def _shutdown(self) -> None:
        with self._lock:
            links = list(self._links)
            peers = list(self._peers)
        for link in links:
            link.close_soon()  # Only queues it: closed below, in one call per run.
        self._flush_doomed()
        for peer in peers:
            # Other threads waiting in a call get a CommunicationError, which _call
            # turns into ClosedTaskDispatcherError.
            peer.shutdown()
        self._anchor.shutdown()

    # -- calls

    def _peer(self) -> Peer:
        peer: Peer | None = getattr(self._local, "peer", None)
        if peer is None:
            peer = Peer(self.uri, self._secret, "client", self._session)
            peer.connect()
            self._local.peer = peer
            with self._lock:
                self._peers.add(peer)
        return peer

    def _call(self, method: str, *args: Any, wait: float = 0.0) -> Any:
        self._check_open()
        if self._doomed:
            self._flush_doomed()
        try:
            return self._peer().call(method, *args, wait=wait)
        except RuntimeError as exc:
            raise ClosedTaskDispatcherError(f"the remote dispatcher is closed: {exc}") from exc
        except (LookupError, CommunicationError) as exc:
            if self.closed:  # close() from another thread ended this call.
                raise ClosedTaskDispatcherError("the dispatcher is closed") from exc
            raise

    def _flush_doomed(self) -> None:
        by_incarnation: dict[str, list[int]] = {}
        while self._doomed:
            incarnation, queue_id = self._doomed.popleft()
            by_incarnation.setdefault(incarnation, []).append(queue_id)
        for incarnation, queue_ids in by_incarnation.items():
            try:
                self._peer().call("close_queues", incarnation, queue_ids)
            except PapyrosError:
                log.debug("could not close abandoned queues", exc_info=True)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} to {self.uri}, {self._state.value}>"


class RemoteQueueLink(QueueLink):
    """One queue on a remote dispatcher: units go out as bytes, outcomes come back."""

    def __init__(self, dispatcher: PyroDispatcherProxy, incarnation: str, queue_id: int) -> None:
        self._dispatcher = dispatcher
        self._incarnation = incarnation
        self._queue_id = queue_id
        self._codec = dispatcher._codec
        self._closed = False
        # How many finished units have arrived from the queue, in all: each fetch says
        # so, and the dispatcher sends again what an interrupted fetch did not deliver.
        self._received = 0
        # One fetch of the queue at a time, for that count to mean what it says.
        self._fetching = threading.Lock()

    def encode(self, unit: Unit) -> Encoded:
        payload = self._codec.encode_unit(unit)
        largest = self._dispatcher._peer().largest_payload
        size = payload_size(payload)
        if size > largest:
            what = "a task" if len(unit) == 1 else f"a unit of {len(unit)} tasks"
            raise SerializationError(
                f"{what} pickles to {size:,} bytes, more than the {largest:,} a message "
                "to the dispatcher may carry; pass less data per task (or fewer tasks per "
                "chunk), or raise the dispatcher's --max-message-size"
            )
        return payload, len(unit)

    def send(self, units: list[Encoded], deadline: float | None) -> list[int]:
        accepted: list[int] = []
        for batch in _calls(units):
            try:
                # Only the first call waits for room: the contract is a prefix, never empty.
                ids = self._submit(batch, time.monotonic() if accepted else deadline)
            except TimeoutError:
                if accepted:
                    break
                raise
            accepted += ids
            if len(ids) < len(batch):
                break
        return accepted

    def _submit(self, units: list[list[Any]], deadline: float | None) -> list[int]:
        while True:
            wait = _wait_for(deadline)
            try:
                ids = self._dispatcher._call(
                    "submit", self._incarnation, self._queue_id, units, wait, wait=wait
                )
                return [int(unit_id) for unit_id in ids]
            except LookupError as exc:
                raise ClosedTaskQueueError(str(exc)) from exc
            except builtins.TimeoutError as exc:
                if isinstance(exc, PapyrosError):
                    raise
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(str(exc)) from None

    def receive(self, deadline: float | None) -> list[tuple[int, Results]]:
        # While another thread fetches from this queue, it takes what comes meanwhile.
        while not self._fetching.acquire(timeout=_wait_for(deadline, LONGEST_WAIT)):
            if deadline is not None and time.monotonic() >= deadline:
                return []
        try:
            while True:
                wait = _wait_for(deadline)
                try:
                    entries = self._dispatcher._call(
                        "fetch", self._incarnation, self._queue_id, wait, self._received, wait=wait
                    )
                except LookupError as exc:
                    raise ClosedTaskQueueError(str(exc)) from exc
                self._received += len(entries)
                if entries:
                    return [self._decode(entry) for entry in entries]
                if deadline is not None and time.monotonic() >= deadline:
                    return []
        finally:
            self._fetching.release()

    def _decode(self, entry: list[Any]) -> tuple[int, Results]:
        unit_id, ntasks, outcome, error = entry
        if error is None:
            return int(unit_id), self._codec.decode_results(outcome)
        message, worker, exitcode, attempts = error
        lost = WorkerLostError(message, worker=worker, exitcode=exitcode, attempts=attempts)
        errors: dict[int, BaseException] = {index: copy.copy(lost) for index in range(ntasks)}
        return int(unit_id), ([None] * ntasks, errors)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._dispatcher._call("close_queues", self._incarnation, [self._queue_id])
        except PapyrosError:
            log.debug("could not close a remote queue", exc_info=True)

    def close_soon(self) -> None:
        if not self._closed:
            self._closed = True
            self._dispatcher._doomed.append((self._incarnation, self._queue_id))


def _calls(units: list[Encoded]) -> Iterator[list[list[Any]]]:
    """The units in runs of about CALL_BYTES (at least one unit per run), one run a call."""
    batch: list[list[Any]] = []
    size = 0
    for payload, ntasks in units:
        unit_bytes = payload_size(payload)
        if batch and size + unit_bytes > CALL_BYTES:
            yield batch
            batch, size = [], 0
        batch.append([payload, ntasks])
        size += unit_bytes
    if batch:
        yield batch


def _wait_for(deadline: float | None, longest: float = LONG_POLL) -> float:
    """How long the next wait may last, given the caller's deadline: a long-poll, or
    ``longest`` (a lock is waited for in waits of up to a day)."""
    if deadline is None:
        return longest
    return max(0.0, min(longest, deadline - time.monotonic()))
