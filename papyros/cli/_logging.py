"""Logging set-up shared by the long-running commands."""

from __future__ import annotations

import logging
import sys

LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def setup_logging(level: str = "", log_file: str = "") -> None:
    """Log papyros's records (and Pyro5's warnings) to ``log_file`` or stderr.

    Raises:
        OSError: ``log_file`` cannot be opened for appending; the message names it.
    """
    handler: logging.Handler
    if log_file:
        try:
            handler = logging.FileHandler(log_file)
        except OSError as exc:
            raise OSError(f"cannot write the log file {log_file!r}: {exc.strerror or exc}") from exc
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("papyros").setLevel(level.upper() if level else "INFO")
    logging.getLogger("Pyro5").setLevel(logging.WARNING)


def add_logging_options(parser: object) -> None:
    parser.add_argument(  # type: ignore[attr-defined]
        "--log-level", choices=LEVELS, type=str.upper, default="INFO", help="(default: INFO)"
    )
    parser.add_argument(  # type: ignore[attr-defined]
        "--log-file", default="", help="log to this file instead of stderr"
    )
