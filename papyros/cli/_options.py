"""Argument types and option groups shared by the distributed commands."""

from __future__ import annotations

import argparse
from typing import Any

from papyros._deadline import check_duration
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


def seconds(text: str) -> float:
    """A duration, as :func:`~papyros._deadline.check_duration` takes it: positive,
    finite, and no longer than a thread may wait."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, not {text!r}") from None
    try:
        return check_duration(value, "a duration")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_group_options(parser: Any) -> None:
    """--group, the name server, the secret and TLS: what every distributed command needs.

    The defaults of --group, --ns-host and --ns-port are the configuration's,
    read when the command runs (see :func:`apply_configuration`), not here: a
    bad papyros.toml must not break --help, nor the commands that do not read it.
    """
    parser.add_argument(
        "-g",
        "--group",
        help="the distributed group (default: $PAPYROS_GROUP or papyros.toml's, else 'default')",
    )
    parser.add_argument(
        "--ns-host",
        help="the Pyro5 name server host (default: $PAPYROS_NS_HOST or papyros.toml's, "
        "else $PYRO_NS_HOST, else localhost)",
    )
    parser.add_argument(
        "--ns-port",
        type=port,
        help="the Pyro5 name server port (default: $PAPYROS_NS_PORT or papyros.toml's, "
        "else $PYRO_NS_PORT, else 9090)",
    )
    parser.add_argument(
        "--secret-file",
        help="the shared secret's file (default: $PAPYROS_SECRET_FILE or papyros.toml's, "
        "else $PAPYROS_SECRET, else ~/.config/papyros/secret)",
    )
    parser.add_argument(
        "--tls-cert",
        help="PEM certificate: enables TLS (default: $PAPYROS_TLS_CERT or papyros.toml's)",
    )
    parser.add_argument(
        "--tls-key",
        help="PEM private key of --tls-cert (default: $PAPYROS_TLS_KEY or papyros.toml's)",
    )
    parser.add_argument(
        "--tls-ca",
        help="PEM CA bundle to verify peers with (default: $PAPYROS_TLS_CA or papyros.toml's)",
    )


# The options of add_group_options that are settings of the configuration too.
_CONFIGURED = ("group", "ns_host", "ns_port", "secret_file", "tls_cert", "tls_key", "tls_ca")


def apply_configuration(args: argparse.Namespace) -> None:
    """Give the options of :func:`add_group_options` not on the command line their
    configured values.

    Raises:
        ConfigurationError: a bad papyros.toml, pyproject.toml or PAPYROS_*
            variable; the message names which.
    """
    config = load_config(**{name: getattr(args, name) for name in _CONFIGURED})
    for name in _CONFIGURED:
        setattr(args, name, getattr(config, name))
    args.secret_file = args.secret_file or None
