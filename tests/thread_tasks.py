"""Task types for the tests of what a worker does with exceptions that are not Exceptions."""

from __future__ import annotations

from typing import Any

import papyros


@papyros.Task.subclass()
def raise_base_exception(error: type[BaseException]) -> None:
    """Raise ``error``, an exception that is not an ``Exception`` (SystemExit and kin)."""
    raise error("raised by the task")


@papyros.Task.subclass()
def raise_or_square(item: Any) -> Any:
    """Square ``item``, or raise it if it is an exception class that is not an ``Exception``."""
    if isinstance(item, type) and issubclass(item, BaseException):
        raise item("raised by the task")
    return item * item


@papyros.Task.subclass(time_limit=60)
def raise_base_exception_in_time(error: type[BaseException]) -> None:
    """As :func:`raise_base_exception`, for a task class with a time limit (which the
    process backend runs wrapped, to watch the limit)."""
    raise error("raised by the task")
