"""Argument types and option groups shared by the distributed commands."""

from __future__ import annotations

import argparse
from typing import Any

from papyros.config import load_config


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
    return value


def positive_int(text: str) -> int:
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def message_size(text: str) -> int:
    # papyros puts up to 4 MiB of payloads in one call (CALL_BYTES), plus the rest of it.
    return _whole_number(text, 5 * 1024 * 1024)


def port(text: str) -> int:
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, not {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {value}")
    return value


def add_group_options(parser: Any) -> None:
    """--group, the name server, the secret and TLS: what every distributed command needs."""
    config = load_config()
    parser.add_argument(
        "-g",
        "--group",
        default=config.group,
        help="the distributed group (default: %(default)s, or $PAPYROS_GROUP)",
    )
    parser.add_argument(
        "--ns-host",
        default=config.ns_host,
        help="the Pyro5 name server host (default: $PYRO_NS_HOST, else localhost)",
    )
    parser.add_argument(
        "--ns-port",
        type=port,
        default=config.ns_port,
        help="the Pyro5 name server port (default: $PYRO_NS_PORT, else 9090)",
    )
    parser.add_argument(
        "--secret-file",
        help="the shared secret's file (default: $PAPYROS_SECRET, else ~/.config/papyros/secret)",
    )
    parser.add_argument("--tls-cert", default="", help="PEM certificate: enables TLS")
    parser.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-ca", default="", help="PEM CA bundle to verify peers with")
