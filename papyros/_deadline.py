"""Timeouts become absolute deadlines once, at the top of each call."""

from __future__ import annotations

import math
import threading
import time

#: The longest one wait blocks before its caller looks at the deadline again: the
#: system calls behind a wait refuse timeouts of centuries.
LONGEST_WAIT = 24 * 3600.0


def deadline_after(timeout: float | None, name: str = "timeout") -> float | None:
    """The ``time.monotonic()`` deadline ``timeout`` seconds from now; None for no limit.

    An infinite timeout is no limit, as None is.

    Raises:
        TypeError: ``timeout`` is not a number.
        ValueError: ``timeout`` is negative, or NaN.
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, not {timeout!r}")
    if not timeout >= 0:  # Also refuses NaN, which no comparison holds for.
        raise ValueError(f"{name} must be >= 0, not {timeout}")
    if math.isinf(timeout):
        return None
    return time.monotonic() + timeout


def check_size(size: int, name: str = "size") -> int:
    """Validate a size bound: a non-negative int, 0 meaning no bound."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"{name} must be an int, not {size!r}")
    if size < 0:
        raise ValueError(f"{name} must be >= 0 (0 means no bound), not {size}")
    return size


def check_duration(value: float, name: str) -> float:
    """Validate a length of time: a positive, finite number of seconds, no longer than a
    thread may wait at once (``threading.TIMEOUT_MAX``).

    Raises:
        TypeError: ``value`` is not a number.
        ValueError: ``value`` is not positive, or NaN, infinite or too long.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {value!r}")
    if not 0 < value <= threading.TIMEOUT_MAX:  # Also refuses NaN, which no comparison holds for.
        raise ValueError(
            f"{name} must be a positive, finite number of seconds "
            f"(at most {threading.TIMEOUT_MAX:.0f}), not {value!r}"
        )
    return float(value)
