"""Configuration: which backend, how many workers, and the rest.

Settings come from, in rising priority:

1. the defaults below;
2. ``papyros.toml`` in the working directory (top-level keys), or else the
   ``[tool.papyros]`` table of ``pyproject.toml`` there;
3. ``PAPYROS_<NAME>`` environment variables (``PAPYROS_BACKEND=thread``);
4. explicit arguments to :func:`papyros.get_dispatcher`.

An unknown key in a file or an argument, or a value of the wrong type, is a
:class:`~papyros.ConfigurationError` naming where it came from.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from papyros.errors import ConfigurationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

__all__ = ["DEFAULT_BACKEND", "Config", "load_config"]

#: The backend used when nothing says otherwise.
DEFAULT_BACKEND = "process"

_ENV_PREFIX = "PAPYROS_"

# Bounds and choices of the settings that have them (an int's least value is otherwise 0).
_LEAST = {"max_attempts": 1}
_MOST = {"ns_port": 65535}
_CHOICES = {"start_method": ("", "spawn", "forkserver", "fork")}


@dataclasses.dataclass(slots=True)
class Config:
    """Every setting papyros reads. A misspelt attribute fails (``__slots__``).

    Attributes:
        backend: the dispatcher backend: ``dummy``, ``thread``, ``process``,
            or one added through the ``papyros.dispatchers`` entry points.
        workers: worker threads or processes; 0 means one per CPU.
        size: the dispatcher's bound on tasks waiting for a worker; 0: none.
        start_method: how the process backend starts workers (``spawn``,
            ``forkserver`` or ``fork``); empty means the backend's safe default.
        max_tasks_per_child: the process backend replaces a worker after this
            many tasks; 0 means never.
        max_attempts: how many times a unit is dispatched before a lost
            worker becomes its outcome (``WorkerLostError``).
        group: the distributed group to join (remote backends). A remote
            backend's client ignores ``workers``, ``size``, ``max_attempts``,
            ``start_method`` and ``max_tasks_per_child``: those belong to its
            dispatcher and worker processes (``start-papyros dispatcher
            --size``, ``start-papyros workers -n``).
        ns_host: the name server host (remote backends); empty: Pyro5's own.
        ns_port: the name server port (remote backends); 0: Pyro5's own.
        secret_file: the file of the shared secret (remote backends); empty:
            ``$PAPYROS_SECRET``, else the per-user file.
        tls_cert, tls_key, tls_ca: PEM files of the certificate, its private key
            and the CA bundle that peers are verified with (remote backends);
            a certificate turns TLS on. Empty: no TLS.
    """

    backend: str = DEFAULT_BACKEND
    workers: int = 0
    size: int = 0
    start_method: str = ""
    max_tasks_per_child: int = 0
    max_attempts: int = 3
    group: str = "default"
    ns_host: str = ""
    ns_port: int = 0
    secret_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""

    def replace(self, source: str, values: Mapping[str, Any]) -> Config:
        """A copy with ``values`` applied; ``source`` names them in error messages."""
        types = {field.name: field.type for field in dataclasses.fields(self)}
        changes = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in types:
                raise ConfigurationError(
                    f"unknown setting {key!r} in {source}; the settings are "
                    f"{', '.join(sorted(types))}"
                )
            changes[name] = _convert(name, value, types[name], source)
        return dataclasses.replace(self, **changes)


def _convert(name: str, value: Any, kind: Any, source: str) -> Any:
    expected = kind if isinstance(kind, str) else kind.__name__
    if expected == "int":
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise ConfigurationError(
                    f"{name} in {source} must be an integer, not {value!r}"
                ) from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigurationError(f"{name} in {source} must be an integer, not {value!r}")
        least, most = _LEAST.get(name, 0), _MOST.get(name)
        if value < least:
            raise ConfigurationError(f"{name} in {source} must be >= {least}, not {value}")
        if most is not None and value > most:
            raise ConfigurationError(f"{name} in {source} must be <= {most}, not {value}")
        return value
    if not isinstance(value, str):
        raise ConfigurationError(f"{name} in {source} must be a string, not {value!r}")
    value = value.strip()
    choices = _CHOICES.get(name)
    if choices is not None and value not in choices:
        raise ConfigurationError(
            f"{name} in {source} must be one of {', '.join(map(repr, choices))}, not {value!r}"
        )
    return value


def _file_settings(directory: Path) -> tuple[str, dict[str, Any]] | None:
    path = directory / "papyros.toml"
    if path.is_file():
        return str(path), _read_toml(path)
    path = directory / "pyproject.toml"
    if path.is_file():
        table = _read_toml(path).get("tool", {}).get("papyros")
        if table is not None:
            if not isinstance(table, dict):
                raise ConfigurationError(f"[tool.papyros] in {path} must be a table")
            return f"[tool.papyros] of {path}", table
    return None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            settings: dict[str, Any] = tomllib.load(file)
            return settings
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path} is not valid TOML: {exc}") from exc


def _env_settings(environ: Mapping[str, str], names: set[str]) -> dict[str, str]:
    """The ``PAPYROS_<NAME>`` variables that name a setting, by variable name."""
    return {
        key: value
        for key, value in environ.items()
        if key.startswith(_ENV_PREFIX) and key[len(_ENV_PREFIX) :].lower() in names
    }


def load_config(
    directory: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Config:
    """Read the configuration: defaults, then file, then environment, then ``overrides``.

    Args:
        directory: where to look for ``papyros.toml`` / ``pyproject.toml``
            (default: the working directory).
        environ: the environment (default: ``os.environ``).
        **overrides: explicit settings; a None value is ignored.

    Raises:
        ConfigurationError: an unknown setting or a bad value.
    """
    config = Config()
    found = _file_settings(Path(directory) if directory is not None else Path.cwd())
    if found is not None:
        config = config.replace(*found)
    names = {field.name for field in dataclasses.fields(config)}
    env = os.environ if environ is None else environ
    for variable, value in _env_settings(env, names).items():
        name = variable[len(_ENV_PREFIX) :].lower()
        config = config.replace(f"${variable}", {name: value})
    explicit = {key: value for key, value in overrides.items() if value is not None}
    return config.replace("the arguments", explicit)
