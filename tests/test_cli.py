"""The start-papyros command, called in-process, and the README's examples, run as scripts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from papyros.cli import build_parser, main
from papyros.cli.demo import factorize

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_demo_runs_and_prints_the_throughput(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--backend", "thread", "--workers", "2", "--tasks", "3000"]) == 0
    out = capsys.readouterr().out
    assert "3,000 numbers factorised" in out
    assert "tasks/s" in out
    assert "2,048 = 2^11" in out


def test_demo_refuses_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--backend", "nonexistent"]) == 2
    assert "unknown backend 'nonexistent'" in capsys.readouterr().err
    assert main(["demo", "--tasks", "0"]) == 2
    assert main(["demo", "--chunksize", "0"]) == 2
    assert "--chunksize must be at least 1" in capsys.readouterr().err
    assert main(["demo", "--workers", "-1"]) == 2
    assert "workers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["demo", "--tasks", "many"])
    assert info.value.code == 2


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "demo" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["dispatcher", "workers"])
@pytest.mark.parametrize("lease", ["nan", "inf", "1e300", "0"])
def test_a_lease_that_is_no_duration_is_a_usage_error(
    command: str, lease: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Only parsed, never run: a lease of nan or inf would have a thread spin or die.
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([command, f"--lease={lease}"])
    assert info.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "argument --lease" in line


@pytest.mark.parametrize("command", ["dispatcher", "workers", "nameserver"])
def test_a_log_file_that_cannot_be_written_fails_in_one_line(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for log_file in (tmp_path / "missing" / "papyros.log", tmp_path):  # A directory, too.
        assert main([command, "--log-file", str(log_file)]) != 0
        [line] = capsys.readouterr().err.splitlines()
        assert f"cannot write the log file {str(log_file)!r}" in line


# A bad papyros.toml or PAPYROS_* variable, and the source its error names.
BAD_CONFIGURATIONS = [
    ("bogus = 1\n", {}, "papyros.toml"),
    ("backend = [\n", {}, "papyros.toml"),
    ("", {"PAPYROS_NS_PORT": "abc"}, "$PAPYROS_NS_PORT"),
]


def _configure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, file: str, variables: dict[str, str]
) -> None:
    monkeypatch.chdir(tmp_path)
    if file:
        (tmp_path / "papyros.toml").write_text(file)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize(
    ("file", "variables"),
    [(file, variables) for file, variables, _ in BAD_CONFIGURATIONS]
    + [("", {"PYRO_NS_PORT": "abc"})],
)
def test_help_reads_no_configuration(
    file: str,
    variables: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _configure(tmp_path, monkeypatch, file, variables)
    for argv in (["--help"], ["dispatcher", "--help"], ["nameserver", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
        assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize(("file", "variables", "source"), BAD_CONFIGURATIONS)
def test_a_bad_configuration_fails_the_commands_that_read_it_in_one_line(
    file: str,
    variables: dict[str, str],
    source: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The name server reads none (see test_pyro.py), and starts all the same.
    _configure(tmp_path, monkeypatch, file, variables)
    for argv in (["dispatcher"], ["workers"], ["status"], ["demo", "-n", "10"]):
        assert main(argv) != 0
        [line] = capsys.readouterr().err.splitlines()
        assert source in line


def test_factorize() -> None:
    for n, expected in [(1, [1]), (2, [2]), (12, [2, 2, 3]), (97, [97]), (360, [2, 2, 2, 3, 3, 5])]:
        task = factorize(n)
        task.execute()
        assert task.result() == (n, expected)


def _run_example(*args: str, cwd: Path = EXAMPLES) -> str:
    done = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_quickstart_example() -> None:
    assert _run_example("quickstart.py").splitlines() == [
        "20000 [2, 2, 2, 2, 2, 5, 5, 5, 5]",
        "40000 [2, 2, 2, 2, 2, 2, 5, 5, 5, 5]",
        "60000 [2, 2, 2, 2, 2, 3, 5, 5, 5, 5]",
        "80000 [2, 2, 2, 2, 2, 2, 2, 5, 5, 5, 5]",
        "100000 [2, 2, 2, 2, 2, 5, 5, 5, 5, 5]",
    ]


def test_the_map_example_as_the_readme_shows_it() -> None:
    code = (EXAMPLES / "map.py").read_text()
    body = code.split('"""', 2)[2].strip()  # Below the docstring.
    assert body in (EXAMPLES.parent / "README.md").read_text()
    assert _run_example("map.py").splitlines() == [
        "100000: [2, 2, 2, 2, 2, 5, 5, 5, 5, 5]",
        "powers: [1024, 81, 1000]",
    ]


def test_the_queues_example() -> None:
    assert sorted(_run_example("queues.py").splitlines()) == [
        "failed: division by zero",
        "result: 0.25",
        "result: 0.5",
        "result: 1.0",
    ]


def test_the_configuration_example() -> None:
    assert _run_example("run.py", cwd=EXAMPLES / "config").startswith(
        "<MultiThreadedTaskDispatcher 2 workers"
    )


def test_python_dash_m_papyros() -> None:
    out = _run_example("-m", "papyros", "demo", "-b", "dummy", "-n", "100")
    assert "100 numbers factorised" in out
