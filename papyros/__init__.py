"""papyros: one simple, uniform way to run many tasks concurrently.

::

    import papyros

    @papyros.Task.subclass()
    def square(x):
        return x * x

    with papyros.get_dispatcher() as dispatcher:
        for result in dispatcher.execute(square(i) for i in range(100)):
            ...

Where the tasks run (inline, threads, local processes, remote workers) is
configuration (see :mod:`papyros.config`), never code. Importing papyros
starts nothing and imports no backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from papyros.config import Config, load_config
from papyros.dispatcher import TaskDispatcher, TaskQueue
from papyros.errors import (
    AuthenticationError,
    BackendUnavailableError,
    ClosedTaskDispatcherError,
    ClosedTaskQueueError,
    CommunicationError,
    ConfigurationError,
    PapyrosError,
    RemoteTaskError,
    SerializationError,
    TimeoutError,
    UnknownBackendError,
    UnprocessedTaskError,
    WorkerLostError,
)
from papyros.task import Task

if TYPE_CHECKING:
    from papyros.dispatchers.dummy import DummyTaskDispatcher
    from papyros.dispatchers.process import MultiProcessTaskDispatcher
    from papyros.dispatchers.thread import MultiThreadedTaskDispatcher
    from papyros.pyro.dispatcher import PyroTaskDispatcher

__version__ = "0.3.0.dev0"

__all__ = [
    "AuthenticationError",
    "BackendUnavailableError",
    "ClosedTaskDispatcherError",
    "ClosedTaskQueueError",
    "CommunicationError",
    "Config",
    "ConfigurationError",
    "DummyTaskDispatcher",
    "MultiProcessTaskDispatcher",
    "MultiThreadedTaskDispatcher",
    "PapyrosError",
    "PyroTaskDispatcher",
    "RemoteTaskError",
    "SerializationError",
    "Task",
    "TaskDispatcher",
    "TaskQueue",
    "TimeoutError",
    "UnknownBackendError",
    "UnprocessedTaskError",
    "WorkerLostError",
    "get_dispatcher",
    "load_config",
]

# Backend classes exported lazily, by the registry name that provides them.
_LAZY_BACKENDS = {
    "DummyTaskDispatcher": "dummy",
    "MultiThreadedTaskDispatcher": "thread",
    "MultiProcessTaskDispatcher": "process",
    "PyroTaskDispatcher": "pyro",
}


def __getattr__(name: str) -> Any:
    backend = _LAZY_BACKENDS.get(name)
    if backend is None:
        raise AttributeError(f"module 'papyros' has no attribute {name!r}")
    from papyros.registry import load_backend

    return load_backend(backend)


def get_dispatcher(backend: str | None = None, **settings: Any) -> TaskDispatcher:
    """Build the dispatcher that the configuration describes.

    Args:
        backend: the backend name; overrides every other source.
        **settings: any other :class:`Config` field (``workers=4``, ``size=100``),
            overriding the file and the environment.

    Raises:
        ConfigurationError: an unknown setting or a bad value.
        UnknownBackendError: no backend of that name (the message lists them).
        BackendUnavailableError: the backend's optional dependency is missing.
    """
    from papyros.registry import load_backend

    config = load_config(backend=backend, **settings)
    return load_backend(config.backend).from_config(config)
