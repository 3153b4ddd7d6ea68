"""Task types used by the tests; module-level so that every backend can import them."""

from __future__ import annotations

import os
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
def add(x: int, y: int = 0) -> int:
    return x + y


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []
