"""What the dispatcher, its workers and its clients share: names, limits, connections."""

from __future__ import annotations

import builtins
import ctypes
import logging
import socket
import threading
from typing import Any

try:
    import Pyro5.api
    import Pyro5.core
    import Pyro5.errors
    import Pyro5.socketutil
    from Pyro5 import config as pyro_config
except ImportError as exc:  # pragma: no cover - exercised only without Pyro5
    raise ImportError("the distributed backend needs Pyro5: pip install 'papyros[pyro]'") from exc

from papyros import _auth
from papyros.errors import AuthenticationError, CommunicationError, ConfigurationError

__all__ = [
    "LONG_POLL",
    "Peer",
    "configure_pyro",
    "dispatcher_name",
    "keep_freed_buffers",
    "locate_dispatcher",
    "locate_ns",
    "name_server_address",
]

log = logging.getLogger("papyros.pyro")

# The longest a single long-poll call waits in the dispatcher. Longer waits
# are made of several calls, so a dead dispatcher is noticed within this time.
LONG_POLL = 5.0

# Seconds a call to the name server may take, connecting included.
NS_TIMEOUT = 10.0

# Slack on top of a call's own wait before its socket times out.
CALL_SLACK = 30.0

# The serializer of every papyros call: marshal carries bytes natively, and
# can represent nothing but plain data, so nothing on the wire is ever code.
SERIALIZER = "marshal"

# The default cap on one message, in bytes.
MAX_MESSAGE_SIZE = 256 * 1024 * 1024

# Room in a message for what goes with its one payload: the largest payload that may
# travel is the smaller cap of the two ends, less this.
MESSAGE_SLACK = 64 * 1024

# About the most payload bytes one call carries: bigger batches of units or outcomes
# are split over several calls, so work flows while the rest is still in transit and
# no message needs a buffer of the size of a whole batch.
CALL_BYTES = 4 * 1024 * 1024

# The most a connection reads at once; bigger messages are read straight into one buffer.
_READ_AHEAD = 64 * 1024

# The largest buffer a connection keeps between messages.
_KEPT_BUFFER = 2 * CALL_BYTES


def dispatcher_name(group: str) -> str:
    """The name server entry of the dispatcher of ``group``."""
    return f"papyros.dispatcher.{group or 'default'}"


def configure_pyro(
    *,
    max_message_size: int = MAX_MESSAGE_SIZE,
    tls_cert: str = "",
    tls_key: str = "",
    tls_ca: str = "",
    server: bool = False,
) -> None:
    """Apply papyros's Pyro5 settings to this process (Pyro5's configuration is global).

    TLS is on when a certificate or a CA bundle is given, and off otherwise.

    Raises:
        ConfigurationError: a TLS file that cannot be read.
    """
    for what, path in (("certificate", tls_cert), ("private key", tls_key), ("CA bundle", tls_ca)):
        if path:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot read the TLS {what} {path}: {exc.strerror or exc}"
                ) from None
    pyro_config.SERIALIZER = SERIALIZER
    pyro_config.MAX_MESSAGE_SIZE = max_message_size
    pyro_config.SOCK_NODELAY = True
    if server:
        pyro_config.THREADPOOL_SIZE = 1000
        pyro_config.THREADPOOL_SIZE_MIN = 8
    if tls_cert or tls_ca:
        # One certificate serves both roles: a dispatcher is also a name server client.
        pyro_config.SSL = True
        pyro_config.SSL_CACERTS = tls_ca
        pyro_config.SSL_CLIENTCERT = tls_cert
        pyro_config.SSL_CLIENTKEY = tls_key
        if server:
            pyro_config.SSL_SERVERCERT = tls_cert
            pyro_config.SSL_SERVERKEY = tls_key
            # With a CA to check them against, peers must show certificates too.
            pyro_config.SSL_REQUIRECLIENTCERT = bool(tls_ca)
    else:
        pyro_config.SSL = False


def keep_freed_buffers() -> None:
    """Let glibc reuse freed big buffers instead of handing them back to the system.

    For the dispatcher and worker processes, whose every call moves payloads of
    up to a few MB. By default glibc maps a fresh region for each such buffer and
    unmaps it when freed, and touching the fresh pages costs about 1 ms per MB
    (page faults): more than all the copying. Kept in the heap, they are reused
    warm; the heap keeps up to 128 MB free before it shrinks. Does nothing on
    other C libraries.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 * 1024 * 1024)  # glibc's largest
    mallopt(m_trim_threshold, 128 * 1024 * 1024)


def locate_ns(ns_host: str = "", ns_port: int = 0) -> Any:
    """A proxy of the name server: at ``ns_host:ns_port``, else where Pyro5's settings say.

    Never broadcasts: papyros sends packets only to the hosts it is told. Every call,
    the connection's first included, times out (a name server that accepts connections
    but does not answer, a stopped process say, must not hang its caller).

    Raises:
        Pyro5.errors.NamingError: the name server cannot be reached.
    """
    host = ns_host or pyro_config.NS_HOST
    port = ns_port or pyro_config.NS_PORT
    if Pyro5.core.URI.isUnixsockLocation(host):
        location = host
    else:
        location = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    proxy = Pyro5.api.Proxy(f"PYRO:{Pyro5.core.NAMESERVER_NAME}@{location}")
    proxy._pyroTimeout = NS_TIMEOUT
    try:
        proxy._pyroBind()
    except Pyro5.errors.PyroError as exc:
        raise Pyro5.errors.NamingError("Failed to locate the nameserver") from exc
    return proxy


def name_server_address(ns_host: str = "", ns_port: int = 0) -> str:
    """Where the name server is looked for: ``host:port``, Pyro5's own configuration
    filling in what is not given."""
    return f"{ns_host or pyro_config.NS_HOST}:{ns_port or pyro_config.NS_PORT}"


def locate_dispatcher(group: str, ns_host: str = "", ns_port: int = 0) -> str:
    """Find the URI of the dispatcher of ``group`` through the name server.

    Raises:
        CommunicationError: the name server is unreachable, or no dispatcher
            of that group is registered.
    """
    where = name_server_address(ns_host, ns_port)
    try:
        with locate_ns(ns_host, ns_port) as ns:
            return str(ns.lookup(dispatcher_name(group)))
    except Pyro5.errors.NamingError as exc:
        if "unknown name" in str(exc):
            raise CommunicationError(
                f"no dispatcher of group {group!r} is registered in the name server at "
                f"{where}; start one with: start-papyros dispatcher --group {group}"
            ) from exc
        raise CommunicationError(
            f"cannot reach the Pyro5 name server at {where}: {exc}; start one with "
            "'start-papyros nameserver', or point to it with --ns-host/--ns-port or "
            "PYRO_NS_HOST/PYRO_NS_PORT"
        ) from exc
    except (Pyro5.errors.CommunicationError, OSError) as exc:
        raise CommunicationError(f"cannot reach the Pyro5 name server at {where}: {exc}") from exc


class _Connection(Pyro5.socketutil.SocketConnection):  # type: ignore[misc]
    """Pyro5's connection, with fewer system calls and no extra copies.

    Pyro5 reads a message in three pieces (start of header, rest of header,
    body), one system call each; this connection reads whatever has arrived,
    up to _READ_AHEAD bytes, and keeps what it did not need yet for the next
    piece (one connection carries one byte stream, read by one thread).
    Big bodies are read straight into one buffer of their size. With a
    timeout on the socket (our proxies have one), Pyro5 also sends in a loop
    that copies the rest of the message after every partial send, quadratic
    in its size; ``sendall`` honours the same timeout and copies nothing.
    """

    # Bytes read from the socket beyond the last piece asked for.
    _ahead = b""
    # The buffer of the last big message, reused for the next one: Pyro5 has decoded a
    # message before it reads the next, and a buffer in use stays warm (no page faults).
    _big: _Received | None = None

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except builtins.TimeoutError:
            raise Pyro5.errors.TimeoutError("sending: timeout") from None
        except OSError as exc:
            raise Pyro5.errors.ConnectionClosedError(f"sending: connection lost: {exc}") from None

    def recv(self, size: int) -> bytes:
        data = self._ahead
        try:
            if len(data) < size and size - len(data) >= _READ_AHEAD:
                self._ahead = b""
                return self._receive_into(data, size)
            while len(data) < size:
                more = self.sock.recv(_READ_AHEAD)
                if not more:
                    raise Pyro5.errors.ConnectionClosedError("receiving: not enough data")
                data += more
        except builtins.TimeoutError:
            raise Pyro5.errors.TimeoutError("receiving: timeout") from None
        except OSError as exc:
            raise Pyro5.errors.ConnectionClosedError(f"receiving: connection lost: {exc}") from None
        if len(data) == size:
            self._ahead = b""
            return data
        self._ahead = data[size:]
        return data[:size]

    def _receive_into(self, start: bytes, size: int) -> bytes:
        buffer = self._buffer(size)
        buffer[: len(start)] = start
        received = len(start)
        with memoryview(buffer) as view:
            while received < size:
                count = self.sock.recv_into(view[received:])
                if not count:
                    raise Pyro5.errors.ConnectionClosedError("receiving: not enough data")
                received += count
        return buffer  # type: ignore[return-value]

    def _buffer(self, size: int) -> _Received:
        buffer = self._big
        if buffer is None or size > _KEPT_BUFFER:
            buffer = _Received(size)
            if size <= _KEPT_BUFFER:
                self._big = buffer
        elif len(buffer) > size:
            del buffer[size:]
        elif len(buffer) < size:
            buffer.extend(bytes(size - len(buffer)))
        return buffer


def use_fast_connection(connection: Any) -> None:
    """Make a Pyro5 connection a :class:`_Connection` (Pyro5 has no hook for its class).

    Call it before the connection has read anything, or after a whole message.
    """
    if type(connection) is Pyro5.socketutil.SocketConnection:
        connection.__class__ = _Connection


class _Received(bytearray):
    """A received message: Pyro5 copies a plain bytearray into bytes before decoding it;
    marshal reads this one where it is."""

    __slots__ = ()


class _AuthenticatingProxy(Pyro5.api.Proxy):  # type: ignore[misc]
    """A Pyro5 proxy that verifies the dispatcher in the connection handshake."""

    def __setattr__(self, name: str, value: Any) -> None:
        # Pyro5 proxies forward unknown attributes to the remote object; ours stay here.
        if name.startswith("_papyros"):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def __init__(self, uri: str, secret: bytes) -> None:
        super().__init__(uri)
        self._papyros_secret = secret
        self._papyros_nonce = _auth.new_nonce()
        self._papyros_dispatcher_nonce = b""
        self._pyroHandshake = {"nonce": self._papyros_nonce}
        self._pyroSerializer = SERIALIZER

    def _pyroBind(self) -> bool:
        bound: bool = super()._pyroBind()
        if self._pyroConnection is not None:
            use_fast_connection(self._pyroConnection)
        return bound

    def _pyroValidateHandshake(self, response: Any) -> None:
        if not isinstance(response, dict) or not isinstance(response.get("nonce"), bytes):
            raise AuthenticationError("the dispatcher sent no proof of the shared secret")
        nonce = response["nonce"]
        try:
            _auth.verify(
                self._papyros_secret,
                _auth.DISPATCHER,
                response.get("proof"),
                self._papyros_nonce,
                nonce,
            )
        except AuthenticationError:
            raise AuthenticationError(
                "the dispatcher could not prove that it knows the shared secret: "
                "refusing to trust it (is its secret the same as ours?)"
            ) from None
        self._papyros_dispatcher_nonce = nonce


class Peer:
    """One authenticated connection to a dispatcher, owned by one thread at a time.

    Both sides prove the secret: the dispatcher in the connection handshake
    (verified before anything it sends is used), this peer in its first call.
    Pyro5 errors are translated into papyros errors here. Only
    :meth:`shutdown` may be called from another thread than the owner's.
    """

    def __init__(self, uri: str, secret: bytes, role: str, session: str = "") -> None:
        self.uri = uri
        self._secret = secret
        self._role = role
        self._session = session
        self._proxy: _AuthenticatingProxy | None = None
        #: Seconds on top of a call's own wait before its socket times out (connecting too).
        self.slack = CALL_SLACK
        # The socket timeout of the current proxy.
        self._timeout = CALL_SLACK
        self.incarnation = ""
        # The largest payload (a unit, or a unit's outcomes) a message to or from the
        # dispatcher may carry, known once connected: the smaller cap of the two ends.
        self.largest_payload: int = pyro_config.MAX_MESSAGE_SIZE - MESSAGE_SLACK
        # Protects _proxy and _shut: shutdown() may take the proxy from under a call.
        self._lock = threading.Lock()
        # Set by shutdown(): no connection is made again.
        self._shut = False

    def connect(self) -> None:
        """Connect and authenticate both ways.

        Raises:
            AuthenticationError: either side failed to prove the secret.
            CommunicationError: the dispatcher is unreachable.
        """
        self.close()
        self._check_not_shut()
        proxy = _AuthenticatingProxy(self.uri, self._secret)
        proxy._pyroTimeout = self._timeout = self.slack
        try:
            proxy._pyroBind()
            proof = _auth.prove(
                self._secret, _auth.PEER, proxy._papyros_dispatcher_nonce, proxy._papyros_nonce
            )
            incarnation, cap = proxy.authenticate(proof, self._role, self._session)
            self.incarnation = str(incarnation)
            self.largest_payload = min(int(cap), pyro_config.MAX_MESSAGE_SIZE) - MESSAGE_SLACK
        except AuthenticationError:
            proxy._pyroRelease()
            raise
        except PermissionError as exc:
            proxy._pyroRelease()
            raise AuthenticationError(f"the dispatcher refused us: {exc}") from exc
        except Pyro5.errors.CommunicationError as exc:
            proxy._pyroRelease()
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, AuthenticationError):
                raise cause from exc
            if "shared secret" in str(exc):
                raise AuthenticationError(str(exc)) from exc
            raise CommunicationError(f"cannot reach the dispatcher at {self.uri}: {exc}") from exc
        except OSError as exc:
            proxy._pyroRelease()
            raise CommunicationError(f"cannot reach the dispatcher at {self.uri}: {exc}") from exc
        with self._lock:
            shut = self._shut
            if not shut:
                self._proxy = proxy
        if shut:  # shutdown() came while this connection was being made.
            proxy._pyroRelease()
            raise self._shut_error()

    def call(self, method: str, *args: Any, wait: float = 0.0) -> Any:
        """Call a method of the dispatcher, connecting first if needed.

        Raises:
            CommunicationError: the connection failed or dropped.
        """
        if self._proxy is None or self._proxy._pyroConnection is None:
            # Never let Pyro5 reconnect by itself: a new connection must authenticate.
            self.connect()
        proxy = self._proxy
        assert proxy is not None
        timeout = wait + self.slack
        if timeout != self._timeout:
            proxy._pyroTimeout = self._timeout = timeout
        try:
            return getattr(proxy, method)(*args)
        except PermissionError as exc:
            raise AuthenticationError(f"the dispatcher refused us: {exc}") from exc
        except BaseException as exc:
            if not isinstance(exc, Exception):
                # Interrupted mid-call (Ctrl-C): the connection is out of step; drop it.
                self.close()
                raise
            if self._proxy is not proxy:
                # shutdown() took the connection from another thread. Pyro5 then says
                # "the calling thread is not the owner of this proxy": it is not ours.
                raise self._shut_error() from exc
            return self._translate(exc)

    def _translate(self, exc: Exception) -> Any:
        try:
            raise exc
        except Pyro5.errors.TimeoutError as timeout:  # Not a builtins.TimeoutError.
            self.close()
            raise CommunicationError(
                f"the dispatcher at {self.uri} did not answer in time: {timeout}"
            ) from timeout
        except builtins.TimeoutError:
            raise  # The dispatcher's own "still full": the caller decides.
        except Pyro5.errors.CommunicationError as exc:
            self.close()
            raise CommunicationError(
                f"lost the connection to the dispatcher at {self.uri}: {exc}"
            ) from exc
        except OSError as exc:
            self.close()
            raise CommunicationError(
                f"lost the connection to the dispatcher at {self.uri}: {exc}"
            ) from exc

    def close(self) -> None:
        """Drop the connection; the next call makes a new one."""
        with self._lock:
            proxy, self._proxy = self._proxy, None
        if proxy is not None:
            _release(proxy)

    def shutdown(self) -> None:
        """Close for good, from any thread.

        A call waiting for its reply in the owner's thread ends at once with
        :class:`CommunicationError`, as does every later call.
        """
        with self._lock:
            self._shut = True
            proxy, self._proxy = self._proxy, None
        if proxy is not None:
            proxy._pyroClaimOwnership()  # Pyro5 lets only a proxy's owner release it.
            _release(proxy)

    def _check_not_shut(self) -> None:
        if self._shut:
            raise self._shut_error()

    def _shut_error(self) -> CommunicationError:
        return CommunicationError(f"the connection to the dispatcher at {self.uri} was shut down")


def _release(proxy: Any) -> None:
    """Close a proxy's connection (Pyro5 shuts its socket down: a call waiting on it ends)."""
    try:
        proxy._pyroRelease()
    except Exception:  # The connection is going anyway.
        log.debug("error releasing a proxy", exc_info=True)


def this_host() -> str:
    return socket.gethostname()
