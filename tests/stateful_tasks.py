"""Task classes written by hand, with their own ``__init__`` and instance state.

Module-level so that every backend can import them. A task of these classes
is not rebuilt from its arguments: it must reach the worker whole.
"""

from __future__ import annotations

import papyros


class Scale(papyros.Task):
    """Keeps ``factor`` on the instance (in its ``__dict__``); only ``x`` is an argument."""

    task_attr = True

    def __init__(self, x: int, factor: int = 2) -> None:
        super().__init__(x)
        self.factor = factor

    def _execute(self, x: int) -> int:
        if x < 0:
            raise ValueError(f"negative: {x}")
        return x * self.factor


class SlottedScale(papyros.Task):
    """As :class:`Scale`, with its state in a slot of its own."""

    __slots__ = ("factor",)
    task_attr = True

    def __init__(self, x: int, factor: int = 2) -> None:
        super().__init__(x)
        self.factor = factor

    def _execute(self, x: int) -> int:
        if x < 0:
            raise ValueError(f"negative: {x}")
        return x * self.factor


class Greeting(papyros.Task):
    """No arguments at all: everything it needs is its own state."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def _execute(self) -> str:
        return "hello " + self.name
