"""Every error papyros raises, in one place.

The hierarchy::

    PapyrosError
     ├── TimeoutError                 (also the builtin TimeoutError)
     ├── ClosedTaskDispatcherError    use of a closed dispatcher
     ├── ClosedTaskQueueError         use of a closed queue
     ├── UnprocessedTaskError         result() of a task that has not run
     ├── WorkerLostError              the worker running a task died
     ├── SerializationError           a task or argument cannot be pickled
     ├── RemoteTaskError              a task's exception that could not travel back
     ├── AuthenticationError          a peer failed to prove the shared secret
     ├── CommunicationError           a dispatcher or name server is unreachable
                                      (also a ConnectionError)
     ├── ConfigurationError           a bad setting (also a ValueError)
     └── UnknownBackendError          no backend of that name (also a LookupError)
          └── BackendUnavailableError a backend whose optional dependency is missing

Foreign errors (pickle, multiprocessing, Pyro5) are translated into these at
the boundary where they happen, with the original chained as ``__cause__``, so
user code never has to import a transport to catch a papyros failure.
"""

from __future__ import annotations

import builtins

__all__ = [
    "AuthenticationError",
    "BackendUnavailableError",
    "ClosedTaskDispatcherError",
    "ClosedTaskQueueError",
    "CommunicationError",
    "ConfigurationError",
    "PapyrosError",
    "RemoteTaskError",
    "SerializationError",
    "TimeoutError",
    "UnknownBackendError",
    "UnprocessedTaskError",
    "WorkerLostError",
]


class PapyrosError(Exception):
    """The root of every error papyros raises about itself."""


class TimeoutError(PapyrosError, builtins.TimeoutError):
    """A deadline passed before the operation could complete.

    Nothing is lost: a result that was not ready is still there for the next call.
    """


class ClosedTaskDispatcherError(PapyrosError):
    """The dispatcher has been closed; it accepts no more work."""


class ClosedTaskQueueError(PapyrosError):
    """The queue has been closed; it accepts no more tasks and yields no more results."""


class UnprocessedTaskError(PapyrosError):
    """``result()`` was asked of a task that has not been executed."""


class WorkerLostError(PapyrosError):
    """The worker running a task died before returning its outcome.

    Attributes:
        worker: an identifier of the lost worker (e.g. its pid), or None.
        exitcode: the worker's exit code, or a negative signal number, if known.
        attempts: how many times the task was dispatched before giving up.
    """

    def __init__(
        self,
        message: str,
        *,
        worker: object = None,
        exitcode: int | None = None,
        attempts: int = 0,
    ) -> None:
        super().__init__(message)
        self.worker = worker
        self.exitcode = exitcode
        self.attempts = attempts

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_worker_lost,
            (str(self), self.worker, self.exitcode, self.attempts),
        )


def _rebuild_worker_lost(
    message: str, worker: object, exitcode: int | None, attempts: int
) -> WorkerLostError:
    return WorkerLostError(message, worker=worker, exitcode=exitcode, attempts=attempts)


class SerializationError(PapyrosError):
    """A task, one of its arguments, or its result cannot be serialized."""


class RemoteTaskError(PapyrosError):
    """A task raised an exception that could not be rebuilt where it was popped.

    Attributes:
        type_name: the qualified name of the original exception's type.
        remote_message: ``str()`` of the original exception.
        traceback: the original traceback, as text.
    """

    def __init__(self, type_name: str, remote_message: str, traceback: str) -> None:
        super().__init__(f"{type_name}: {remote_message}")
        self.type_name = type_name
        self.remote_message = remote_message
        self.traceback = traceback

    def __reduce__(self) -> tuple[object, ...]:
        return (RemoteTaskError, (self.type_name, self.remote_message, self.traceback))


class AuthenticationError(PapyrosError):
    """A peer could not prove that it knows the shared secret."""


class CommunicationError(PapyrosError, ConnectionError):
    """A remote dispatcher or name server cannot be reached, or the connection dropped.

    The message names the address and, where there is one, the remedy.
    """


class ConfigurationError(PapyrosError, ValueError):
    """A setting has a bad name or value; the message names its source."""


class UnknownBackendError(PapyrosError, LookupError):
    """No dispatcher backend is registered under the requested name."""


class BackendUnavailableError(UnknownBackendError):
    """A known backend cannot be loaded because an optional dependency is missing."""
