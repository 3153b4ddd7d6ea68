"""Task types for the distributed backend's fault tests; importable by remote workers."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import papyros


@papyros.Task.subclass()
def note_pid_then_sleep(path: str, seconds: float, value: Any = None) -> Any:
    """Append this worker's pid to ``path`` (the task has started), then sleep."""
    with open(path, "a") as file:
        file.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    return value


@papyros.Task.subclass()
def kill_my_worker(path: str) -> None:
    """A poison task: note the attempt, then SIGKILL the worker running it."""
    with open(path, "a") as file:
        file.write(f"{os.getpid()}\n")
    os.kill(os.getpid(), signal.SIGKILL)


@papyros.Task.subclass()
def whoami() -> tuple[str, int]:
    return ("worker", os.getpid())


class Boom:
    """Unpickling this creates the file at ``path``: proof that a pickle was executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))
