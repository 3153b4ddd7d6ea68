"""Task types used by the tests; module-level so that every backend can import them."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import pickle
import signal
import time
from pathlib import Path
from typing import Any

import papyros


@papyros.Task.subclass()
def identity(value: Any) -> Any:
    return value


@papyros.Task.subclass()
def square(x: int) -> int:
    return x * x


@papyros.Task.subclass()
def fail_if_odd(x: int) -> int:
    if x % 2:
        raise ValueError(f"odd: {x}")
    return x


@papyros.Task.subclass()
def sleep_then(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


@papyros.Task.subclass()
def record(path: str, value: Any, seconds: float = 0.0) -> Any:
    """Append ``value`` to the file at ``path`` (one line: the task ran), then sleep."""
    with open(path, "a") as file:
        file.write(f"{value}\n")
    time.sleep(seconds)
    return value


@papyros.Task.subclass()
def interrupt(pid: int) -> None:
    """Deliver Ctrl-C to the client process."""
    os.kill(pid, signal.SIGINT)
    time.sleep(1)


@papyros.Task.subclass(task_attr=True, traceback_attr=True)
def annotated_failure(x: int) -> int:
    raise KeyError(x)


@papyros.Task.subclass()
def stop_at(x: int, last: int) -> int:
    if x == last:
        raise StopIteration(x)
    return x


@papyros.Task.subclass()
def add(x: int, y: int = 0) -> int:
    return x + y


def cube(x: int) -> int:
    """A plain function, no Task type: for ``map``."""
    return x * x * x


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


# -- for the process backend's fault tests (tests/test_process.py)


@papyros.Task.subclass()
def worker_pid(seconds: float = 0.0) -> int:
    """The pid of the worker that runs it, after ``seconds``."""
    time.sleep(seconds)
    return os.getpid()


@papyros.Task.subclass()
def announce_then_sleep(path: str, seconds: float, value: Any = None) -> Any:
    """Append this worker's pid to ``path`` (the task has started), then sleep."""
    with open(path, "a") as file:
        file.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    return value


@papyros.Task.subclass()
def kill_own_worker(path: str) -> None:
    """A poison task: note the attempt in ``path``, then SIGKILL the worker running it."""
    with open(path, "a") as file:
        file.write(f"{os.getpid()}\n")
    os.kill(os.getpid(), signal.SIGKILL)


@papyros.Task.subclass()
def exit_worker(code: int) -> None:
    """Leave the worker process at once, as a C extension calling exit() would."""
    os._exit(code)


@papyros.Task.subclass()
def make_lock() -> Any:
    """A result that cannot be pickled."""
    import threading

    return threading.Lock()


class NeedsTwoArguments(Exception):
    """An exception that pickles but cannot be rebuilt: its __init__ wants two arguments."""

    def __init__(self, first: str, second: str) -> None:
        super().__init__(f"{first}/{second}")


@papyros.Task.subclass()
def raise_unrebuildable() -> None:
    raise NeedsTwoArguments("one", "two")


@papyros.Task.subclass()
def raise_unpicklable() -> None:
    import threading

    error = RuntimeError("holds a lock")
    error.lock = threading.Lock()  # type: ignore[attr-defined]
    raise error


@papyros.Task.subclass()
def call(function: Any, *args: Any) -> Any:
    return function(*args)


@papyros.Task.subclass(time_limit=1.0)
def limited_sleep(seconds: float, value: Any = None) -> Any:
    """Sleeps; may run for at most 1 s on a backend that enforces time limits."""
    time.sleep(seconds)
    return value


class Scaled(papyros.Task):
    """A Task written as a class: its own ``__init__`` and ``_execute``."""

    __slots__ = ("factor",)

    def __init__(self, x: int, factor: int = 10) -> None:
        super().__init__(x)
        self.factor = factor

    def _execute(self, x: int) -> int:
        if x < 0:
            raise ValueError(f"negative: {x}")
        return x * self.factor


# -- for the distributed backend's tests (tests/test_pyro.py)


@papyros.Task.subclass()
def whoami() -> tuple[str, int]:
    return ("worker", os.getpid())


class Boom:
    """Unpickling this creates the file at ``path``: proof that a pickle was executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


@papyros.Task.subclass()
def hold_gil(seconds: int, path: str) -> int:
    """Note the run in ``path``, then sleep in C without releasing the GIL, as a long
    call into an extension can: no other thread of the worker runs meanwhile."""
    with open(path, "a") as file:
        file.write(f"{os.getpid()}\n")
    ctypes.PyDLL(None).sleep(seconds)
    return seconds


# -- tasks and values that papyros's own machinery once tripped over


class Blob:
    """Bytes that pickle out of band, as a NumPy array's do (a ``pickle.PickleBuffer``)."""

    def __init__(self, data: bytearray) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        if protocol >= 5:
            return (Blob, (pickle.PickleBuffer(self.data),))
        return (Blob, (bytes(self.data),))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Blob) and bytes(self.data) == bytes(other.data)

    __hash__ = None  # type: ignore[assignment]


@papyros.Task.subclass()
def blob_size(blob: Blob) -> int:
    return len(blob.data)


@papyros.Task.subclass()
def make_blob(size: int) -> Blob:
    return Blob(bytearray(b"b" * size))


@dataclasses.dataclass(frozen=True)
class FrozenError(Exception):
    """An exception that refuses new attributes (a frozen dataclass)."""

    code: int


@papyros.Task.subclass(task_attr=True, traceback_attr=True)
def raise_frozen(code: int) -> None:
    raise FrozenError(code)


class WithFunctionMethod(papyros.Task):
    """A Task class with a method of its own named ``function``."""

    def function(self) -> str:
        return "a method"

    def _execute(self, x: int) -> int:
        return x * 2


class BrokenRun(papyros.Task):
    """Fails in the machinery around the task (``_run``), not in the task's own code."""

    def _run(self, escaping: Any = BaseException) -> Any:
        raise RuntimeError("broken machinery")

    def _execute(self, x: int) -> int:
        return x


class Unprintable:
    """A value whose repr fails."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Unprintable)

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        raise RuntimeError("no repr")
