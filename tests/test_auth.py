"""Where the shared secret comes from, and the proofs made with it."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from papyros import AuthenticationError, ConfigurationError
from papyros._auth import (
    DISPATCHER,
    PEER,
    SECRET_ENV,
    load_secret,
    new_nonce,
    prove,
    verify,
)

FILE_SECRET = "from-the-file-0123456789abcdef"
ENV_SECRET = "from-the-environment-0123456789"


@pytest.fixture
def config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A per-user configuration directory of the test's own, and no secret in the environment."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv(SECRET_ENV, raising=False)
    return tmp_path / "config"


def test_an_explicit_file_wins_over_the_environment(
    config_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(FILE_SECRET + "\n")
    monkeypatch.setenv(SECRET_ENV, ENV_SECRET)
    assert load_secret(secret_file) == FILE_SECRET.encode()
    assert load_secret(str(secret_file)) == FILE_SECRET.encode()


def test_without_a_file_the_environment_is_used(
    config_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, ENV_SECRET)
    assert load_secret() == ENV_SECRET.encode()
    assert not (config_home / "papyros" / "secret").exists()


def test_without_either_a_private_per_user_file_is_made_once(config_home: Path) -> None:
    secret = load_secret()
    path = config_home / "papyros" / "secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(secret) >= 32
    assert load_secret() == secret


def test_a_missing_or_short_secret_is_a_configuration_error(
    config_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigurationError, match="cannot read the secret file"):
        load_secret(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()  # Only the per-user file is ever made.
    short = tmp_path / "short"
    short.write_text("tiny\n")
    with pytest.raises(ConfigurationError, match=f"from {short} is too short"):
        load_secret(short)
    monkeypatch.setenv(SECRET_ENV, "tiny")
    with pytest.raises(ConfigurationError, match=f"from \\${SECRET_ENV} is too short"):
        load_secret()


def test_a_proof_holds_only_for_its_secret_role_and_nonces() -> None:
    secret = ENV_SECRET.encode()
    ours, theirs = new_nonce(), new_nonce()
    proof = prove(secret, PEER, ours, theirs)
    verify(secret, PEER, proof, ours, theirs)
    for args in [
        (b"another-secret-0123456789", PEER, proof, ours, theirs),
        (secret, DISPATCHER, proof, ours, theirs),  # Reflected back as the other role.
        (secret, PEER, proof, theirs, ours),
        (secret, PEER, proof, new_nonce(), theirs),  # Replayed in another exchange.
        (secret, PEER, "not bytes", ours, theirs),
    ]:
        with pytest.raises(AuthenticationError):
            verify(*args)  # type: ignore[arg-type]
