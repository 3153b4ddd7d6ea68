"""The shared secret, and the challenge/response that proves knowledge of it.

An authenticated client can run any code on every worker of its group, so
authentication is always on. The secret is read from, in order:

1. a file given explicitly (``--secret-file``);
2. the ``PAPYROS_SECRET`` environment variable;
3. a per-user file, ``$XDG_CONFIG_HOME/papyros/secret`` (default
   ``~/.config/papyros/secret``), created with mode 0600 on first use.

On one machine one user needs no setup; across machines, copy the file.

The proofs are HMAC-SHA256 over both peers' fresh random nonces, each role
with its own label, so a proof can neither be replayed nor reflected back.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from papyros.errors import AuthenticationError, ConfigurationError

__all__ = [
    "SECRET_ENV",
    "default_secret_path",
    "load_secret",
    "new_nonce",
    "prove",
    "verify",
]

SECRET_ENV = "PAPYROS_SECRET"

# The label of each role's proof: a dispatcher's proof is never a valid peer's.
DISPATCHER = b"papyros-dispatcher-v1"
PEER = b"papyros-peer-v1"

_MIN_SECRET_BYTES = 16


def default_secret_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(Path.home(), ".config")
    return Path(base) / "papyros" / "secret"


def load_secret(secret_file: str | os.PathLike[str] | None = None) -> bytes:
    """The shared secret: from ``secret_file``, the environment, or the per-user file.

    Raises:
        ConfigurationError: the secret is too short, or the file cannot be read.
    """
    value = os.environ.get(SECRET_ENV)
    if value and not secret_file:
        source = f"${SECRET_ENV}"
        secret = value.encode()
    else:
        path = Path(secret_file) if secret_file else default_secret_path()
        source = str(path)
        if not secret_file and not path.exists():
            _create_secret_file(path)
        try:
            secret = path.read_bytes().strip()
        except OSError as exc:
            raise ConfigurationError(f"cannot read the secret file {path}: {exc}") from exc
    if len(secret) < _MIN_SECRET_BYTES:
        raise ConfigurationError(
            f"the secret from {source} is too short: use at least {_MIN_SECRET_BYTES} characters"
        )
    return secret


def _create_secret_file(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # Another process created it first: use theirs.
    with os.fdopen(fd, "w") as file:
        file.write(secrets.token_hex(32) + "\n")


def new_nonce() -> bytes:
    return secrets.token_bytes(32)


def prove(secret: bytes, role: bytes, *nonces: bytes) -> bytes:
    """The proof that the holder of ``secret`` speaks as ``role`` in this exchange."""
    message = role + b"".join(len(nonce).to_bytes(2, "big") + nonce for nonce in nonces)
    return hmac.new(secret, message, hashlib.sha256).digest()


def verify(secret: bytes, role: bytes, proof: object, *nonces: bytes) -> None:
    """Check a peer's proof in constant time.

    Raises:
        AuthenticationError: the proof is missing or wrong.
    """
    if not isinstance(proof, bytes) or not hmac.compare_digest(prove(secret, role, *nonces), proof):
        raise AuthenticationError("the peer could not prove that it knows the shared secret")
