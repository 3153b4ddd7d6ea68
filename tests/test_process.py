"""Faults that only the process backend can suffer, each really done (DESIGN 3.8, issue 3).

Workers are really killed, really exit, really run over their time limit; a
client is really interrupted with SIGINT. The behaviour suite covers the
rest of the contract on this backend.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import papyros
from papyros.dispatchers._pipes import ReadyWaiter, recv_framed, send_framed
from papyros.dispatchers.process import MultiProcessTaskDispatcher
from tests.tasks import (
    Unprintable,
    announce_then_sleep,
    call,
    exit_worker,
    fail_if_odd,
    identity,
    kill_own_worker,
    limited_sleep,
    lines,
    make_lock,
    raise_unpicklable,
    raise_unrebuildable,
    record,
    square,
    worker_pid,
)

REPO = Path(__file__).resolve().parent.parent

Factory = Callable[..., MultiProcessTaskDispatcher]


@pytest.fixture
def make() -> Iterator[Factory]:
    """Process dispatchers (2 workers unless told), all closed at teardown."""
    opened: list[MultiProcessTaskDispatcher] = []

    def factory(num_workers: int = 2, **settings: int) -> MultiProcessTaskDispatcher:
        dispatcher = MultiProcessTaskDispatcher(num_workers, **settings)  # type: ignore[arg-type]
        opened.append(dispatcher)
        return dispatcher

    yield factory
    for dispatcher in opened:
        dispatcher.close()


def worker_pids(parent: int | None = None) -> set[int]:
    """The pids of the live worker processes of ``parent`` (default: this process)."""
    pids = set()
    for child in psutil.Process(parent).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                pids.add(child.pid)
        except psutil.Error:
            pass
    return pids


def wait_for_lines(path: Path, count: int, timeout: float = 30.0) -> list[str]:
    """Wait (bounded) until tasks have written ``count`` lines to ``path``."""
    deadline = time.monotonic() + timeout
    while len(found := lines(path)) < count:
        assert time.monotonic() < deadline, f"only {len(found)} of {count} tasks started"
        time.sleep(0.01)
    return found


def wait_for_workers(count: int, timeout: float = 30.0) -> set[int]:
    """Wait (bounded) until this process has ``count`` live workers, as after a replacement,
    which the dispatcher starts just after it has handed out the lost worker's outcomes."""
    deadline = time.monotonic() + timeout
    while len(found := worker_pids()) != count:
        assert time.monotonic() < deadline, f"{len(found)} workers, not {count}"
        time.sleep(0.01)
    return found


def run_python(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a Python interpreter in the repository, as a user would run their script."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
        check=False,
    )


# ------------------------------------------------------------ lost workers


def test_a_worker_killed_mid_task_is_replaced_and_its_task_rerun(
    make: Factory, tmp_path: Path
) -> None:
    dispatcher = make(2)
    started = tmp_path / "started"
    with dispatcher.make_queue() as queue:
        for i in range(20):
            queue.push(announce_then_sleep(str(started), 0.1, i))
        victim = int(wait_for_lines(started, 1)[0])
        os.kill(victim, signal.SIGKILL)
        results = sorted(queue.pop(timeout=30) for _ in range(20))
    assert results == list(range(20))
    workers = worker_pids()
    assert victim not in workers
    assert len(workers) == 2  # The killed worker was replaced.


def test_a_poison_task_fails_after_the_retry_limit_and_spares_the_others(
    make: Factory, tmp_path: Path
) -> None:
    dispatcher = make(2, max_attempts=3)
    attempts = tmp_path / "attempts"
    tasks = [kill_own_worker(str(attempts)), *(square(i) for i in range(50))]
    results = dispatcher.execute(tasks, ordered=True)
    with pytest.raises(papyros.WorkerLostError) as info:
        next(results)
    assert list(results) == [i * i for i in range(50)]
    error = info.value
    assert error.exitcode == -signal.SIGKILL
    assert error.attempts == 3
    assert "killed by signal 9" in str(error)
    assert "3 times" in str(error)
    # No respawn storm: the poison ran once per attempt, plus once more if its first death
    # could not be pinned on it (its worker also held another unit), and two workers remain.
    assert len(lines(attempts)) in (3, 4)
    wait_for_workers(2)


def test_a_poison_task_among_many_fails_alone(make: Factory, tmp_path: Path) -> None:
    # Workers hold many short units at once, and send outcomes in batches: a worker that
    # dies may have finished units whose outcomes it had not sent yet.
    dispatcher = make(2, max_attempts=2)
    attempts = tmp_path / "attempts"
    for _ in range(3):
        attempts.unlink(missing_ok=True)
        tasks = [*(square(i) for i in range(500)), kill_own_worker(str(attempts))]
        tasks += [square(i) for i in range(500, 1000)]
        results = dispatcher.execute(tasks, ordered=True)
        values = []
        while True:
            try:
                values.append(next(results))
            except papyros.WorkerLostError as exc:
                values.append(exc.attempts)
            except StopIteration:
                break
        assert values == [*(i * i for i in range(500)), 2, *(i * i for i in range(500, 1000))]
        assert len(lines(attempts)) <= 3


def test_os_exit_in_a_task_is_a_lost_worker_not_a_result(make: Factory) -> None:
    dispatcher = make(2, max_attempts=2)
    results = dispatcher.execute([exit_worker(0), square(3)], ordered=True)
    with pytest.raises(papyros.WorkerLostError) as info:
        next(results)
    assert info.value.exitcode == 0
    assert info.value.attempts == 2
    assert "exited with code 0" in str(info.value)
    assert list(results) == [9]


# ------------------------------------------------------------ serialization


def test_an_unpicklable_argument_fails_at_push_naming_it(make: Factory) -> None:
    dispatcher = make(1)
    with dispatcher.make_queue() as queue:
        with pytest.raises(papyros.SerializationError, match="argument 0") as info:
            queue.push(identity(threading.Lock()))
        assert "lock" in str(info.value)
        assert dispatcher.num_tasks() == 0
        queue.push(identity("still usable"))
        assert queue.pop(timeout=30) == "still usable"


@pytest.mark.parametrize("how", ["execute", "map"])
def test_a_task_that_cannot_be_sent_is_an_outcome_and_its_chunk_still_runs(
    make: Factory, how: str
) -> None:
    dispatcher = make(1)
    items = [1, threading.Lock(), 3, 4]
    if how == "execute":
        results = dispatcher.execute((identity(item) for item in items), ordered=True, chunksize=4)
    else:
        results = dispatcher.map(identity, items, ordered=True, chunksize=4)
    assert next(results) == 1
    with pytest.raises(papyros.SerializationError, match="argument 0"):
        next(results)
    assert list(results) == [3, 4]


@pytest.mark.parametrize("chunksize", [1, 3])
def test_payloads_of_many_megabytes_arrive_whole_and_in_order(
    make: Factory, chunksize: int
) -> None:
    # 12 MB: execute sends what it has pulled every few MB, not the whole window at once.
    payloads = [bytes([index]) * 1_000_000 for index in range(12)]
    tasks = (identity(payload) for payload in payloads)
    assert list(make(2).execute(tasks, ordered=True, chunksize=chunksize)) == payloads


def test_workers_of_long_tasks_hold_one_at_a_time(make: Factory) -> None:
    dispatcher = make(2)
    # Each worker learns that its units are long (over _ALONE_SECONDS).
    assert len(set(dispatcher.execute(worker_pid(0.2) for _ in range(4)))) == 2
    # Two long tasks first: a worker that held two units at once would take both.
    tasks = [worker_pid(0.5), worker_pid(0.5), worker_pid(), worker_pid()]
    ran_on = list(dispatcher.execute(tasks, ordered=True))
    assert ran_on[0] != ran_on[1]


def test_long_tasks_after_short_ones_are_shared_between_the_workers(make: Factory) -> None:
    dispatcher = make(2)
    wait_for_workers(2)
    # Thousands of no-op tasks: each worker learns to hold up to hundreds of units ahead.
    assert sum(dispatcher.execute(identity(i) for i in range(5000))) == sum(range(5000))
    # Then 40 long ones, all pending at once: a worker that asks more often than the
    # other must not take them all.
    ran_on = Counter(dispatcher.execute(worker_pid(0.05) for _ in range(40)))
    assert len(ran_on) == 2
    assert min(ran_on.values()) >= 15, ran_on


def test_a_worker_hands_back_units_that_turn_out_long(make: Factory) -> None:
    dispatcher = make(2)
    wait_for_workers(2)
    assert sum(dispatcher.execute(identity(i) for i in range(5000))) == sum(range(5000))
    # One worker takes the 50 long tasks in one batch, sized for no-op ones, and the
    # other the short ones: the first must hand back what it cannot start soon.
    tasks = [worker_pid(0.04) for _ in range(50)] + [worker_pid() for _ in range(50)]
    ran_on = list(dispatcher.execute(tasks, ordered=True))
    long_ones = Counter(ran_on[:50])
    assert len(long_ones) == 2
    assert min(long_ones.values()) >= 15, long_ones


def test_a_unit_the_worker_cannot_unpickle_fails_its_tasks_not_the_worker(
    make: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dispatcher = make(1)
    [pid] = set(dispatcher.execute([worker_pid()]))
    # A module the client can import and the worker, started before, cannot.
    (tmp_path / "client_only_tasks.py").write_text(
        "import papyros\n\n\n@papyros.Task.subclass()\ndef double(x):\n    return 2 * x\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "client_only_tasks", raising=False)
    import client_only_tasks  # type: ignore[import-not-found]

    results = dispatcher.execute([client_only_tasks.double(1), worker_pid()], ordered=True)
    with pytest.raises(papyros.SerializationError, match=r"could not unpickle.*client_only_tasks"):
        next(results)
    assert next(results) == pid  # The same worker went on.
    sys.modules.pop("client_only_tasks", None)


def test_lambdas_and_closures_travel_by_value(make: Factory) -> None:
    offset = 10

    def add_offset(x: int) -> int:
        return x + offset

    tasks = [call(lambda x: x * 2, 21), call(add_offset, 1)]
    assert list(make(1).execute(tasks, ordered=True)) == [42, 11]


def test_outcomes_that_cannot_travel_become_remote_task_errors(make: Factory) -> None:
    dispatcher = make(1)
    with dispatcher.make_queue() as queue:
        queue.push(worker_pid())
        pid = queue.pop(timeout=30)

        queue.push(make_lock())
        with pytest.raises(papyros.RemoteTaskError) as info:
            queue.pop(timeout=30)
        assert "lock" in info.value.type_name
        assert "could not be pickled" in info.value.remote_message

        queue.push(raise_unrebuildable())
        with pytest.raises(papyros.RemoteTaskError) as info:
            queue.pop(timeout=30)
        assert info.value.type_name == "tests.tasks.NeedsTwoArguments"
        assert info.value.remote_message == "one/two"
        assert "raise_unrebuildable" in info.value.traceback

        queue.push(raise_unpicklable())
        with pytest.raises(papyros.RemoteTaskError) as info:
            queue.pop(timeout=30)
        assert info.value.type_name == "RuntimeError"
        assert info.value.remote_message == "holds a lock"

        queue.push(worker_pid())
        assert queue.pop(timeout=30) == pid  # The same worker lived on through all of it.


def test_a_task_exception_carries_its_remote_traceback(make: Factory) -> None:
    with pytest.raises(ValueError, match="odd: 1") as info:
        next(make(1).execute([fail_if_odd(1)]))
    cause = str(info.value.__cause__)
    assert "fail_if_odd" in cause
    assert "ValueError: odd: 1" in cause


MAIN_SCRIPT = """
import json

import papyros
from tests.tasks import call


@papyros.Task.subclass()
def triple(x):
    return 3 * x


class Point:
    def __init__(self, x):
        self.x = x


@papyros.Task.subclass()
def make_point(x):
    return Point(x)


def main():
    scale = 5

    def scaled(x):
        return scale * x

    with papyros.MultiProcessTaskDispatcher(2) as dispatcher:
        ones = list(dispatcher.execute((triple(i) for i in range(10)), ordered=True))
        chunks = list(dispatcher.execute((triple(i) for i in range(10)), ordered=True, chunksize=4))
        functions = list(
            dispatcher.execute([call(lambda x: x + 1, 1), call(scaled, 2)], ordered=True)
        )
        point = next(dispatcher.execute([make_point(7)]))
    print(json.dumps([ones, chunks, functions, type(point) is Point, point.x]))


if __name__ == "__main__":
    main()
"""


@pytest.mark.parametrize("how", ["script", "-c"])
def test_tasks_defined_in_main_work(tmp_path: Path, how: str) -> None:
    script = tmp_path / "main_tasks.py"
    script.write_text(MAIN_SCRIPT)
    args = [str(script)] if how == "script" else ["-c", MAIN_SCRIPT]
    done = run_python(*args)
    assert done.returncode == 0, done.stderr
    ones, chunks, functions, same_class, x = json.loads(done.stdout)
    assert ones == chunks == [3 * i for i in range(10)]
    assert functions == [2, 10]
    assert same_class is True  # The result's class comes back as the client's own.
    assert x == 7


UNGUARDED_SCRIPT = """
import papyros
from tests.tasks import square

# No `if __name__ == "__main__":`: each worker, importing this module, tries to start
# workers of its own, and fails before it is ready.
with papyros.MultiProcessTaskDispatcher(2) as dispatcher:
    try:
        list(dispatcher.execute([square(2)], timeout=60))
    except papyros.ClosedTaskDispatcherError as exc:
        print("refused:", exc)
"""


def test_an_unguarded_main_module_is_named_in_the_error_the_user_gets(tmp_path: Path) -> None:
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED_SCRIPT)
    done = run_python(str(script))
    assert done.returncode == 0, done.stderr
    refused = [line for line in done.stdout.splitlines() if line.startswith("refused:")]
    assert len(refused) == 1, done.stdout
    assert "worker processes in a row died before they were ready" in refused[0]
    assert "if __name__ == '__main__':" in refused[0]


# ------------------------------------------------------------ cancelling and closing


CTRL_C_CLIENT = """
import papyros
from tests.tasks import sleep_then

if __name__ == "__main__":
    dispatcher = papyros.MultiProcessTaskDispatcher(2)
    for count, _ in enumerate(dispatcher.execute(sleep_then(0.2) for _ in range(10_000))):
        if count == 0:
            print("running", flush=True)
"""


def test_ctrl_c_in_a_client_stops_it_at_once_and_reaps_every_child(tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text(CTRL_C_CLIENT)
    client = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "running"
        children = psutil.Process(client.pid).children(recursive=True)
        assert len(worker_pids(client.pid)) == 2
        interrupted = time.monotonic()
        client.send_signal(signal.SIGINT)
        _, stderr = client.communicate(timeout=10)
        elapsed = time.monotonic() - interrupted
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()
    assert "KeyboardInterrupt" in stderr
    assert client.returncode != 0
    assert elapsed < 5, f"the client took {elapsed:.1f} s to stop"
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"orphaned: {[process.pid for process in alive]}"


def test_breaking_out_of_execute_stops_its_pending_work(make: Factory, tmp_path: Path) -> None:
    dispatcher = make(2)
    ran = tmp_path / "ran"
    for value in dispatcher.execute(record(str(ran), i, 0.01) for i in range(5000)):
        if value >= 20:
            break
    gc.collect()
    assert dispatcher.num_queues() == 0
    assert dispatcher.num_tasks() == 0
    dispatcher.close()
    assert len(lines(ran)) < 500


def test_max_tasks_per_child_recycles_workers_without_losing_tasks(make: Factory) -> None:
    dispatcher = make(1, max_tasks_per_child=2)
    pids = list(dispatcher.execute(worker_pid() for _ in range(10)))
    assert len(pids) == 10
    per_worker = Counter(pids)
    assert max(per_worker.values()) <= 2
    assert len(per_worker) >= 5


def test_close_with_running_tasks_returns_quickly_and_leaves_no_child(
    make: Factory, tmp_path: Path
) -> None:
    dispatcher = make(2)
    started = tmp_path / "started"
    queue = dispatcher.make_queue()
    for _ in range(4):
        queue.push(announce_then_sleep(str(started), 60))
    wait_for_lines(started, 2)
    assert len(worker_pids()) == 2
    closing = time.monotonic()
    dispatcher.close()
    assert time.monotonic() - closing < 5
    assert worker_pids() == set()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("papyros-")]


# ------------------------------------------------------------ time limits


def test_a_task_over_its_time_limit_is_killed_and_times_out(make: Factory) -> None:
    dispatcher = make(2)
    start = time.monotonic()
    tasks = [limited_sleep(60, "never" * 100_000), *(limited_sleep(0.01, i) for i in range(10))]
    results = dispatcher.execute(tasks, ordered=True)
    with pytest.raises(papyros.TimeoutError, match="time limit of 1 s") as info:
        next(results)
    assert isinstance(info.value, TimeoutError)
    assert "tests.tasks.limited_sleep(60, 'nevernever" in str(info.value)
    assert len(str(info.value)) < 400  # The task is named in brief, whatever its arguments.
    assert list(results) == list(range(10))
    assert time.monotonic() - start < 20
    wait_for_workers(2)  # The killed worker is replaced.


def test_a_timed_task_that_finished_stops_its_clock(make: Factory, tmp_path: Path) -> None:
    dispatcher = make(1)
    # Short units first: the worker is then sent two units at a time.
    assert sum(dispatcher.map(square, range(20))) == sum(i * i for i in range(20))
    started = tmp_path / "started"
    tasks = [limited_sleep(0, "quick"), announce_then_sleep(str(started), 1.5, "long")]
    # The untimed task, held with the timed one, runs past the timed one's limit (1 s).
    assert list(dispatcher.execute(tasks, ordered=True, timeout=30)) == ["quick", "long"]
    assert len(lines(started)) == 1  # It was not killed, nor run again.


def test_a_timed_task_s_arguments_need_not_print(make: Factory) -> None:
    dispatcher = make(1)
    tasks = [limited_sleep(0, Unprintable()), limited_sleep(0, 1)]
    assert list(dispatcher.execute(tasks, ordered=True, chunksize=2)) == [Unprintable(), 1]


# ------------------------------------------------------------ pipes


def test_large_and_small_payloads_cross_both_ways_intact(make: Factory) -> None:
    dispatcher = make(2)
    sizes = [0, 1, 65_535, 65_536, 1 << 20, (3 << 20) + 7] * 3
    payloads = [os.urandom(size) for size in sizes]
    for chunksize in (1, 4):
        results = dispatcher.execute(
            (identity(payload) for payload in payloads), ordered=True, chunksize=chunksize
        )
        assert list(results) == payloads


@pytest.mark.parametrize("writes", ["whole", "partial"])
def test_a_message_of_more_buffers_than_one_write_takes_arrives_whole(
    writes: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if writes == "partial":  # As when a signal interrupts a write: the rest must follow.
        writev = os.writev
        monkeypatch.setattr(
            os, "writev", lambda fd, buffers: writev(fd, [b"".join(buffers)[:70_001]])
        )
    payloads = [os.urandom(size) for size in (0, 1, 100, 70_000)] * 300  # 1,200 buffers, 21 MB.
    reader, writer = multiprocessing.Pipe(duplex=False)
    received: list[tuple[Any, list[Any]]] = []
    # The pipe holds far less than the message: a thread must read while this one writes.
    thread = threading.Thread(target=lambda: received.extend(recv_framed(reader) for _ in range(3)))
    thread.start()
    send_framed(writer, ("header", 3), payloads)
    send_framed(writer, "small", [b"a", b"", b"bc"])
    send_framed(writer, "pieces", [(b"a", memoryview(b"bc")), b"d", (), (b"e" * 70_000, b"f")])
    thread.join()
    header, got = received[0]
    assert header == ("header", 3)
    assert [bytes(payload) for payload in got] == payloads
    header, got = received[1]
    assert (header, [bytes(payload) for payload in got]) == ("small", [b"a", b"", b"bc"])
    header, got = received[2]
    assert header == "pieces"
    assert [bytes(payload) for payload in got] == [b"abc", b"d", b"", b"e" * 70_000 + b"f"]
    writer.close()
    with pytest.raises(EOFError):
        recv_framed(reader)
    reader.close()


def test_the_reader_s_waiter_follows_a_changing_set_of_pipes() -> None:
    waiter = ReadyWaiter()
    first_reader, first_writer = multiprocessing.Pipe(duplex=False)
    second_reader, second_writer = multiprocessing.Pipe(duplex=False)
    try:
        assert waiter.wait([first_reader], 0.01) == []  # Nothing to read: the timeout.
        first_writer.send(1)
        assert waiter.wait([first_reader], 0.01) == [first_reader]
        first_reader.recv()
        # A new set: the pipe added is watched, the one left out is not.
        second_writer.send(2)
        first_writer.send(3)
        assert waiter.wait([second_reader], 0.01) == [second_reader]
        second_reader.recv()
        assert waiter.wait([second_reader], 0.01) == []
        second_writer.close()  # Closed at the other end: ready, to read the EOF.
        ready = waiter.wait([first_reader, second_reader], None)
        assert sorted(map(id, ready)) == sorted(map(id, [first_reader, second_reader]))
    finally:
        for end in (first_reader, first_writer, second_reader, second_writer):
            end.close()
