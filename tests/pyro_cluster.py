"""Real distributed deployments for tests: name server, dispatcher and workers as processes.

Everything binds to 127.0.0.1 on ports the OS picks. Each piece is started
with the same ``start-papyros`` command a user runs, and stopped with SIGTERM
(then SIGKILL if it does not go), so the tests exercise the real shutdown.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

# The shared secret of test deployments (and of the test process, as client).
SECRET = "papyros-test-secret-0123456789"

_START_TIMEOUT = 30.0


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "papyros", *args]


def environment(secret: str = SECRET) -> dict[str, str]:
    env = dict(os.environ)
    env["PAPYROS_SECRET"] = secret
    env.pop("PYRO_NS_HOST", None)
    env.pop("PYRO_NS_PORT", None)
    return env


def read_line(process: subprocess.Popen[str], pattern: str, timeout: float) -> re.Match[str]:
    """Read ``process``'s stdout until a line matches ``pattern``; fail after ``timeout``."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise AssertionError(f"{process.args} did not print {pattern!r} in {timeout} s")
            line = process.stdout.readline()
            if not line:
                raise AssertionError(f"{process.args} exited ({process.wait()}) before {pattern!r}")
            match = re.search(pattern, line)
            if match:
                return match


def stop(process: subprocess.Popen[str], grace: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()
    return process.returncode


class Cluster:
    """Start and stop the pieces of a deployment; logs go to ``log_dir``."""

    def __init__(self, ns_port: int, log_dir: Path, secret: str = SECRET) -> None:
        self.ns_port = ns_port
        self.log_dir = log_dir
        self.secret = secret
        self.processes: list[subprocess.Popen[str]] = []

    def _start(self, name: str, args: list[str], secret: str | None) -> subprocess.Popen[str]:
        log = open(self.log_dir / f"{name}-{len(self.processes)}.log", "w")  # noqa: SIM115
        process = subprocess.Popen(
            command(*args),
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=environment(secret or self.secret),
        )
        log.close()
        self.processes.append(process)
        return process

    def start_dispatcher(
        self, group: str, *extra: str, secret: str | None = None
    ) -> tuple[subprocess.Popen[str], str]:
        process = self._start(
            "dispatcher",
            ["dispatcher", "--group", group, "--ns-port", str(self.ns_port), *extra],
            secret,
        )
        uri = read_line(process, r"ready at (\S+)", _START_TIMEOUT).group(1)
        return process, uri

    def start_workers(
        self, group: str, count: int = 2, *extra: str, secret: str | None = None
    ) -> subprocess.Popen[str]:
        process = self._start(
            "workers",
            ["workers", "-n", str(count), "--group", group, "--ns-port", str(self.ns_port), *extra],
            secret,
        )
        read_line(process, r"starting \d+ workers", _START_TIMEOUT)
        return process

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text()}" for path in sorted(self.log_dir.glob("*.log"))
        )

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            stop(process)
        self.processes.clear()


def start_nameserver() -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        command("nameserver", "--port", "0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=environment(),
    )
    port = int(read_line(process, r"@127\.0\.0\.1:(\d+)", _START_TIMEOUT).group(1))
    return process, port
