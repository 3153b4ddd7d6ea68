"""Task types for the tests of what a worker does with exceptions that are not Exceptions."""

from __future__ import annotations

import papyros


@papyros.Task.subclass()
def raise_base_exception(error: type[BaseException]) -> None:
    """Raise ``error``, an exception that is not an ``Exception`` (SystemExit and kin)."""
    raise error("raised by the task")
