"""Configuration sources and their priority, the backend registry, and the package surface."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import papyros
from papyros import registry
from papyros.config import DEFAULT_BACKEND, load_config


def test_defaults(tmp_path: Path) -> None:
    config = load_config(tmp_path, environ={})
    assert config.backend == DEFAULT_BACKEND
    assert (config.workers, config.size) == (0, 0)


def test_priority_file_then_environment_then_arguments(tmp_path: Path) -> None:
    (tmp_path / "papyros.toml").write_text('backend = "dummy"\nworkers = 3\nsize = 7\n')
    config = load_config(tmp_path, environ={})
    assert (config.backend, config.workers, config.size) == ("dummy", 3, 7)
    env = {"PAPYROS_WORKERS": "5", "PAPYROS_UNRELATED": "x"}
    config = load_config(tmp_path, environ=env)
    assert (config.backend, config.workers, config.size) == ("dummy", 5, 7)
    config = load_config(tmp_path, environ=env, workers=9, backend=None)
    assert (config.backend, config.workers) == ("dummy", 9)


def test_the_secret_and_tls_files_are_settings_and_the_secret_is_not(tmp_path: Path) -> None:
    (tmp_path / "papyros.toml").write_text('tls_cert = "cert.pem"\ntls_key = "key.pem"\n')
    env = {"PAPYROS_TLS_KEY": "other.pem", "PAPYROS_SECRET_FILE": "secret", "PAPYROS_SECRET": "x"}
    config = load_config(tmp_path, environ=env)
    assert (config.tls_cert, config.tls_key, config.tls_ca) == ("cert.pem", "other.pem", "")
    # $PAPYROS_SECRET is the secret itself, read where it is used, never a setting.
    assert config.secret_file == "secret"
    assert not hasattr(config, "secret")


def test_pyproject_table(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n[tool.papyros]\nsize = 4\n')
    assert load_config(tmp_path, environ={}).size == 4
    # papyros.toml, when present, is the one read.
    (tmp_path / "papyros.toml").write_text("size = 5\n")
    assert load_config(tmp_path, environ={}).size == 5


def test_bad_settings_name_their_source(tmp_path: Path) -> None:
    (tmp_path / "papyros.toml").write_text("wrokers = 2\n")
    with pytest.raises(papyros.ConfigurationError, match=r"'wrokers'.*papyros.toml"):
        load_config(tmp_path, environ={})
    (tmp_path / "papyros.toml").write_text("workers = 'two'\n")
    with pytest.raises(papyros.ConfigurationError, match="workers"):
        load_config(tmp_path, environ={})
    (tmp_path / "papyros.toml").write_text("workers = [\n")
    with pytest.raises(papyros.ConfigurationError, match="not valid TOML"):
        load_config(tmp_path, environ={})
    (tmp_path / "papyros.toml").unlink()
    with pytest.raises(papyros.ConfigurationError, match=r"\$PAPYROS_SIZE"):
        load_config(tmp_path, environ={"PAPYROS_SIZE": "-3"})
    with pytest.raises(ValueError, match="nonsense"):
        load_config(tmp_path, environ={}, nonsense=1)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("PAPYROS_MAX_ATTEMPTS", "0", "must be >= 1"),
        ("PAPYROS_NS_PORT", "70000", "must be <= 65535"),
        ("PAPYROS_START_METHOD", "spoon", "must be one of '', 'spawn'"),
    ],
)
def test_values_out_of_bounds_name_their_source(
    tmp_path: Path, variable: str, value: str, message: str
) -> None:
    with pytest.raises(papyros.ConfigurationError, match=rf"\${variable} {message}"):
        load_config(tmp_path, environ={variable: value})
    assert load_config(tmp_path, environ={variable: {"0": "1", "70000": "80"}.get(value, "fork")})


def test_get_dispatcher_reads_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PAPYROS_BACKEND", "thread")
    monkeypatch.setenv("PAPYROS_WORKERS", "3")
    with papyros.get_dispatcher() as dispatcher:
        assert isinstance(dispatcher, papyros.MultiThreadedTaskDispatcher)
        assert dispatcher.num_workers == 3
    with papyros.get_dispatcher("dummy") as dispatcher:
        assert isinstance(dispatcher, papyros.DummyTaskDispatcher)


def test_an_unknown_backend_lists_the_known_ones() -> None:
    with pytest.raises(LookupError, match="dummy, thread") as info:
        papyros.get_dispatcher("nonexistent")
    assert isinstance(info.value, papyros.UnknownBackendError)


def test_a_backend_with_a_missing_dependency_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(
        registry._BUILTINS,
        "fancy",
        registry._Builtin("papyros_no_such_module:Dispatcher", "papyros[fancy]"),
    )
    with pytest.raises(papyros.BackendUnavailableError, match=r"pip install papyros\[fancy\]"):
        registry.load_backend("fancy")


def test_backends_from_entry_points_are_found(monkeypatch: pytest.MonkeyPatch) -> None:
    target = "papyros.dispatchers.dummy:DummyTaskDispatcher"
    monkeypatch.setattr(registry, "_entry_points", lambda: {"plugin": target})
    assert "plugin" in registry.backend_names()
    assert registry.load_backend("plugin") is papyros.DummyTaskDispatcher
    monkeypatch.setattr(
        registry, "_entry_points", lambda: {"broken": "papyros.errors:PapyrosError"}
    )
    with pytest.raises(papyros.UnknownBackendError, match="not a TaskDispatcher"):
        registry.load_backend("broken")


def test_import_papyros_is_light() -> None:
    code = (
        "import sys, papyros\n"
        "heavy = [m for m in sys.modules if m.startswith(('Pyro5', 'papyros.dispatchers',"
        " 'papyros.pyro', 'multiprocessing', 'cloudpickle'))]\n"
        "assert not heavy, heavy\n"
        "import threading; assert threading.active_count() == 1\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_everything_in_all_exists() -> None:
    for name in papyros.__all__:
        assert getattr(papyros, name) is not None, name
    with pytest.raises(AttributeError):
        papyros.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018


def test_errors_form_one_hierarchy() -> None:
    for name in dir(papyros.errors):
        value = getattr(papyros.errors, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, papyros.PapyrosError), name
    assert issubclass(papyros.TimeoutError, TimeoutError)
    lost = papyros.WorkerLostError("gone", worker=3, exitcode=-9, attempts=2)
    import pickle

    clone = pickle.loads(pickle.dumps(lost))
    assert (str(clone), clone.worker, clone.exitcode, clone.attempts) == ("gone", 3, -9, 2)
