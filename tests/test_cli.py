"""The start-papyros command, called in-process, and the README's examples, run as scripts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from papyros.cli import main
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
