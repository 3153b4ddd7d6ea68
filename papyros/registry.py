"""The backend registry: dispatcher classes found by name, imported only when used.

Built-in backends are listed here; third parties add theirs through the
``papyros.dispatchers`` entry-point group, e.g. in their ``pyproject.toml``::

    [project.entry-points."papyros.dispatchers"]
    mybackend = "mypackage.dispatcher:MyTaskDispatcher"
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import NamedTuple

from papyros.dispatcher import TaskDispatcher
from papyros.errors import BackendUnavailableError, UnknownBackendError

__all__ = ["ENTRY_POINT_GROUP", "backend_names", "load_backend"]

ENTRY_POINT_GROUP = "papyros.dispatchers"


class _Builtin(NamedTuple):
    target: str  # "module:ClassName"
    install: str  # what to install if its import fails for a missing dependency


_BUILTINS: dict[str, _Builtin] = {
    "dummy": _Builtin("papyros.dispatchers.dummy:DummyTaskDispatcher", ""),
    "thread": _Builtin("papyros.dispatchers.thread:MultiThreadedTaskDispatcher", ""),
    "process": _Builtin("papyros.dispatchers.process:MultiProcessTaskDispatcher", ""),
    "pyro": _Builtin("papyros.pyro.dispatcher:PyroTaskDispatcher", "'papyros[pyro]'"),
}


def _entry_points() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def backend_names() -> list[str]:
    """The names of every known backend, built-in first."""
    names = list(_BUILTINS)
    names.extend(sorted(set(_entry_points()) - set(names)))
    return names


def load_backend(name: str) -> type[TaskDispatcher]:
    """Import and return the dispatcher class registered as ``name``.

    Raises:
        UnknownBackendError: no backend has that name (the message lists them).
        BackendUnavailableError: the backend needs an optional dependency that
            is not installed (the message says what to install).
    """
    builtin = _BUILTINS.get(name)
    if builtin is not None:
        target, install = builtin
    else:
        found = _entry_points().get(name)
        if found is None:
            raise UnknownBackendError(
                f"unknown backend {name!r}; the known backends are {', '.join(backend_names())}"
            )
        target, install = found, ""
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        remedy = f"; install it with: pip install {install}" if install else ""
        raise BackendUnavailableError(
            f"the {name!r} backend cannot be loaded: {exc}{remedy}"
        ) from exc
    cls = getattr(module, attribute, None)
    if not (isinstance(cls, type) and issubclass(cls, TaskDispatcher)):
        raise UnknownBackendError(f"backend {name!r} ({target}) is not a TaskDispatcher class")
    return cls
