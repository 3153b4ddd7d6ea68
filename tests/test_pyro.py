"""What is specific to the distributed backend, with real processes on 127.0.0.1.

The contract itself is checked by the behaviour suite, on every backend.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import multiprocessing
import os
import pickle
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

import papyros
from papyros.pyro.worker import WorkerOptions, worker_main
from tests.pyro_cluster import Cluster, command, environment, read_line, stop
from tests.tasks import (
    Boom,
    announce_then_sleep,
    call,
    hold_gil,
    identity,
    kill_own_worker,
    square,
    whoami,
)

pytestmark = pytest.mark.usefixtures("pyro_cluster")


def wait_until(condition: Callable[[], object], timeout: float = 30.0, what: str = "") -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.05)


def pids_in(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def client(cluster: Cluster, group: str) -> papyros.TaskDispatcher:
    return papyros.get_dispatcher("pyro", group=group, ns_port=cluster.ns_port)


def worker_pids(dispatcher: papyros.TaskDispatcher) -> set[int]:
    return {worker["pid"] for worker in dispatcher.get_stats()["workers"]}  # type: ignore[attr-defined]


def test_two_groups_never_share_workers(pyro_cluster: Cluster) -> None:
    pyro_cluster.start_dispatcher("red")
    pyro_cluster.start_dispatcher("blue")
    pyro_cluster.start_workers("red", 2)
    pyro_cluster.start_workers("blue", 1)
    with client(pyro_cluster, "red") as red, client(pyro_cluster, "blue") as blue:
        red_pids = {pid for _, pid in red.execute(whoami() for _ in range(200))}
        blue_pids = {pid for _, pid in blue.execute(whoami() for _ in range(200))}
        assert len(blue_pids) == 1
        assert red_pids.isdisjoint(blue_pids)
        wait_until(lambda: len(worker_pids(red)) == 2, what="two red workers")
        assert worker_pids(red).isdisjoint(worker_pids(blue))


def test_workers_started_first_join_when_the_dispatcher_appears(pyro_cluster: Cluster) -> None:
    pyro_cluster.start_workers("early", 2)
    pyro_cluster.start_dispatcher("early")
    with client(pyro_cluster, "early") as dispatcher:
        assert sorted(dispatcher.execute(square(i) for i in range(20))) == [
            i * i for i in range(20)
        ]


def test_a_restarted_dispatcher_is_rejoined_and_old_clients_get_an_error(
    pyro_cluster: Cluster,
) -> None:
    first, _ = pyro_cluster.start_dispatcher("phoenix")
    pyro_cluster.start_workers("phoenix", 2)
    old = client(pyro_cluster, "phoenix")
    assert list(old.execute([square(3)])) == [9]
    queue = old.make_queue()
    first.kill()
    first.wait()
    # The old client's queue died with the dispatcher: a clear error, not a hang.

    def push_and_pop() -> object:
        queue.push(square(1))
        return queue.pop(timeout=20)

    with pytest.raises(papyros.PapyrosError):
        push_and_pop()
    old.close()
    pyro_cluster.start_dispatcher("phoenix")
    with client(pyro_cluster, "phoenix") as new:
        assert sorted(new.execute(square(i) for i in range(50))) == [i * i for i in range(50)]
        wait_until(lambda: len(worker_pids(new)) == 2, what="both workers back")


def test_a_client_goes_on_with_a_dispatcher_restarted_at_the_same_address(
    pyro_cluster: Cluster,
) -> None:
    port = str(_free_port())
    first, _ = pyro_cluster.start_dispatcher("lazarus", "--port", port)
    pyro_cluster.start_workers("lazarus", 1)
    with client(pyro_cluster, "lazarus") as old:
        queue = old.make_queue()
        stop(first)
        pyro_cluster.start_dispatcher("lazarus", "--port", port)
        failures = 0
        while True:  # The first call may find its connection gone: a papyros error.
            try:
                new_queue = old.make_queue()
                break
            except papyros.CommunicationError:
                failures += 1
                assert failures == 1
        new_queue.push(square(4))
        assert new_queue.pop(timeout=30) == 16
        with pytest.raises(papyros.ClosedTaskQueueError):
            queue.push(square(1))  # Lost with the first run of the dispatcher.


INTERRUPTED_CLIENT = """
import os, signal, sys, threading, time
import papyros
from tests.tasks import sleep_then, square
with papyros.get_dispatcher("pyro", group="hasty-client", ns_port=int(sys.argv[1])) as client:
    other = client.make_queue()
    other.push(square(7))
    queue = client.make_queue()
    queue.push(sleep_then(2.0, "late"))
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
    try:
        queue.pop(timeout=30)
    except KeyboardInterrupt:
        print("interrupted")
    # Past the end of the long-poll that the interrupt abandoned: its reply went nowhere.
    time.sleep(7)
    print(queue.pop(timeout=30), other.pop(timeout=30))
"""


def test_a_pop_interrupted_by_ctrl_c_loses_nothing(pyro_cluster: Cluster) -> None:
    pyro_cluster.start_dispatcher("hasty-client")
    pyro_cluster.start_workers("hasty-client", 2)
    done = _run_client(INTERRUPTED_CLIENT, str(pyro_cluster.ns_port))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["interrupted", "late", "49"]


def test_queues_outlive_the_thread_that_made_their_client(pyro_cluster: Cluster) -> None:
    pyro_cluster.start_dispatcher("handover")
    pyro_cluster.start_workers("handover", 1)
    made: dict[str, object] = {}

    def make() -> None:  # As a request handler might, in a thread that then ends.
        dispatcher = client(pyro_cluster, "handover")
        queue = dispatcher.make_queue()
        queue.push(square(3))
        made.update(dispatcher=dispatcher, queue=queue)

    thread = threading.Thread(target=make)
    thread.start()
    thread.join()
    gc.collect()  # The thread's connection goes with it.
    dispatcher, queue = made["dispatcher"], made["queue"]
    assert isinstance(dispatcher, papyros.TaskDispatcher)
    assert isinstance(queue, papyros.TaskQueue)
    with dispatcher:
        assert queue.pop(timeout=30) == 9
        queue.push(square(4))
        assert queue.pop(timeout=30) == 16


def test_closing_a_queue_cancels_the_units_a_worker_took_ahead(
    pyro_cluster: Cluster, tmp_path: Path
) -> None:
    pyro_cluster.start_dispatcher("prefetch")
    pyro_cluster.start_workers("prefetch", 1)
    started = tmp_path / "started"
    with client(pyro_cluster, "prefetch") as dispatcher:
        wait_until(lambda: len(worker_pids(dispatcher)) == 1, what="a worker")
        blocker = dispatcher.make_queue()
        blocker.push(announce_then_sleep(str(tmp_path / "blocker"), 0.5))
        wait_until(lambda: pids_in(tmp_path / "blocker"), what="the worker to be busy")
        queue = dispatcher.make_queue()
        for i in range(4):  # Then it takes two at a time: one runs, one waits.
            queue.push(announce_then_sleep(str(started), 1.0, i))
        wait_until(lambda: pids_in(started), what="the first task to start")
        queue.close()
        stats = dispatcher.get_stats  # type: ignore[attr-defined]
        wait_until(lambda: stats()["inflight_units"] == 0, what="the worker to be done")
        assert len(pids_in(started)) == 1  # The one it had taken ahead never started.
        # And the worker goes on with other work.
        assert list(dispatcher.execute([square(5)], timeout=30)) == [25]


def test_kill_9_of_a_worker_mid_task_loses_no_result(pyro_cluster: Cluster, tmp_path: Path) -> None:
    pyro_cluster.start_dispatcher("fragile")
    pyro_cluster.start_workers("fragile", 2)
    started = tmp_path / "started"
    with client(pyro_cluster, "fragile") as dispatcher:
        queue = dispatcher.make_queue()
        for i in range(6):
            queue.push(announce_then_sleep(str(started), 0.5, i))
        wait_until(lambda: pids_in(started), what="a task to start")
        os.kill(pids_in(started)[0], signal.SIGKILL)
        assert sorted(queue.pop(timeout=30) for _ in range(6)) == list(range(6))
        # The killed worker is replaced.
        wait_until(lambda: len(worker_pids(dispatcher)) == 2, what="a replacement worker")


@pytest.mark.parametrize("lease", [float("nan"), float("inf"), 1e300, 0, -1.0])
def test_a_lease_that_is_no_duration_is_refused_by_the_constructors(lease: float) -> None:
    # Refused before anything starts: a lease of NaN or inf would have a thread spin or die.
    with pytest.raises(ValueError, match="lease must be a positive, finite number of seconds"):
        papyros.PyroTaskDispatcher(lease=lease, register=False)
    with pytest.raises(ValueError, match="lease must be a positive, finite number of seconds"):
        WorkerOptions(lease=lease)
    with pytest.raises(TypeError, match="lease must be a number of seconds"):
        WorkerOptions(lease="10")  # type: ignore[arg-type]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="vouching reads /proc")
def test_a_worker_whose_task_holds_the_gil_keeps_its_lease(
    pyro_cluster: Cluster, tmp_path: Path
) -> None:
    pyro_cluster.start_dispatcher("gil", "--lease", "1")
    pyro_cluster.start_workers("gil", 1, "--lease", "1")
    runs = tmp_path / "runs"
    with client(pyro_cluster, "gil") as dispatcher:
        wait_until(lambda: len(worker_pids(dispatcher)) == 1, what="a worker")
        # Its heartbeat thread cannot run for 4 s, four leases: its manager vouches for it.
        queue = dispatcher.make_queue()
        queue.push(hold_gil(4, str(runs)))
        assert queue.pop(timeout=60) == 4
        assert len(pids_in(runs)) == 1  # It was not taken for dead and run again.


def test_a_stopped_worker_s_units_are_redispatched_and_its_late_result_dropped(
    pyro_cluster: Cluster, tmp_path: Path
) -> None:
    pyro_cluster.start_dispatcher("sleepy", "--lease", "1")
    pyro_cluster.start_workers("sleepy", 2, "--lease", "1")
    started = tmp_path / "started"
    with client(pyro_cluster, "sleepy") as dispatcher:
        wait_until(lambda: len(worker_pids(dispatcher)) == 2, what="two workers")
        queue = dispatcher.make_queue()
        queue.push(announce_then_sleep(str(started), 1.5, "once"))
        wait_until(lambda: pids_in(started), what="the task to start")
        frozen = pids_in(started)[0]
        os.kill(frozen, signal.SIGSTOP)
        try:
            assert queue.pop(timeout=30) == "once"
            assert len(pids_in(started)) == 2  # It ran again, elsewhere.
        finally:
            os.kill(frozen, signal.SIGCONT)
        # The thawed worker finishes the task, is told it was presumed dead, and
        # registers again; its late result must not be delivered.
        wait_until(lambda: frozen in worker_pids(dispatcher), what="the thawed worker back")
        assert queue.pop_many(timeout=0) == []
        assert dispatcher.num_tasks() == 0


def test_a_unit_for_a_worker_presumed_lost_while_it_waited_is_not_lost(
    pyro_cluster: Cluster,
) -> None:
    # The worker waits in a long-poll (5 s) for work; stopped, it misses its lease (1 s)
    # while the poll still waits, and the task pushed then wakes that poll.
    pyro_cluster.start_dispatcher("waiting", "--lease", "1")
    pyro_cluster.start_workers("waiting", 1, "--lease", "1")
    with client(pyro_cluster, "waiting") as dispatcher:
        wait_until(lambda: len(worker_pids(dispatcher)) == 1, what="a worker")
        list(dispatcher.execute([square(1)], timeout=30))  # It has asked for work again.
        (frozen,) = worker_pids(dispatcher)
        os.kill(frozen, signal.SIGSTOP)
        try:
            wait_until(lambda: not worker_pids(dispatcher), what="the worker presumed lost")
            queue = dispatcher.make_queue()
            queue.push(square(7))
        finally:
            os.kill(frozen, signal.SIGCONT)
        # Thawed, it registers again and runs the task, which was not handed to it for good.
        assert queue.pop(timeout=30) == 49
        assert dispatcher.get_stats()["inflight_units"] == 0  # type: ignore[attr-defined]


def test_a_poison_task_ends_as_worker_lost(pyro_cluster: Cluster, tmp_path: Path) -> None:
    pyro_cluster.start_dispatcher("poison", "--max-attempts", "2")
    pyro_cluster.start_workers("poison", 2)
    attempts = tmp_path / "attempts"
    with client(pyro_cluster, "poison") as dispatcher:
        results = dispatcher.execute([kill_own_worker(str(attempts)), square(4)], ordered=True)
        with pytest.raises(papyros.WorkerLostError) as info:
            next(results)
        assert info.value.attempts == 2
        assert "2 times" in str(info.value)
        assert next(results) == 16
        # Once per attempt, plus once if its first death could not be pinned on it (its
        # worker also held the other task).
        assert len(pids_in(attempts)) in (2, 3)


def test_workers_dying_at_once_delay_only_their_own_slot(pyro_cluster: Cluster) -> None:
    # No dispatcher: the workers wait for it, alive, and are killed as soon as they exist.
    manager = pyro_cluster.start_workers("fragile", 2)

    def workers() -> list[psutil.Process]:
        children = psutil.Process(manager.pid).children()
        return [child for child in children if "spawn_main" in " ".join(child.cmdline())]

    wait_until(lambda: len(workers()) == 2, what="two workers")
    first = workers()
    for worker in first:
        worker.kill()
    log = next(pyro_cluster.log_dir.glob("workers-*.log"))
    wait_until(lambda: log.read_text().count("exited") == 2, what="both deaths logged")
    # Each slot's first quick death: each waits 0.5 s, not 0.5 s then 1 s as if one slot.
    assert log.read_text().count("replacing it in 0.5 s") == 2
    wait_until(lambda: len(workers()) == 2, what="both slots filled again")
    assert {worker.pid for worker in workers()}.isdisjoint(worker.pid for worker in first)


# ------------------------------------------------------------ authentication


def test_a_client_refuses_a_dispatcher_with_another_secret(pyro_cluster: Cluster) -> None:
    pyro_cluster.start_dispatcher("impostor", secret="another-secret-0123456789")
    with pytest.raises(papyros.AuthenticationError, match="dispatcher could not prove"):
        client(pyro_cluster, "impostor")


def test_a_dispatcher_refuses_a_client_with_another_secret(pyro_cluster: Cluster) -> None:
    _, uri = pyro_cluster.start_dispatcher("guarded")
    from papyros.pyro._common import Peer

    # A peer with the wrong secret that does not even check the dispatcher's proof.
    peer = Peer(uri, b"wrong-secret-0123456789", "client", "intruder")
    with pytest.raises(papyros.AuthenticationError):
        peer.connect()
    peer.close()
    # The dispatcher goes on serving everyone else.
    pyro_cluster.start_workers("guarded", 1)
    with client(pyro_cluster, "guarded") as dispatcher:
        assert list(dispatcher.execute([square(5)])) == [25]


def test_workers_with_another_secret_are_refused(pyro_cluster: Cluster) -> None:
    pyro_cluster.start_dispatcher("closed-shop")
    pyro_cluster.start_workers("closed-shop", 1, secret="another-secret-0123456789")
    wait_until(lambda: "worker refused" in pyro_cluster.logs(), what="the refusal to be logged")
    with client(pyro_cluster, "closed-shop") as dispatcher:
        assert dispatcher.get_stats()["workers"] == []  # type: ignore[attr-defined]


def _raw_proxy(uri: str) -> object:
    """A Pyro5 proxy that completes the handshake without knowing the secret."""
    import Pyro5.api

    from papyros import _auth

    proxy = Pyro5.api.Proxy(uri)
    proxy._pyroSerializer = "marshal"
    proxy._pyroHandshake = {"nonce": _auth.new_nonce()}
    return proxy


def test_an_unauthenticated_peer_cannot_call_anything(
    pyro_cluster: Cluster, tmp_path: Path
) -> None:
    _, uri = pyro_cluster.start_dispatcher("fortress")
    sentinel = tmp_path / "pwned"
    hostile = pickle.dumps(Boom(str(sentinel)))
    calls = {
        "authenticate": (hostile, "client", "x"),
        "open_queue": (hostile,),
        "close_queues": (hostile, [1]),
        "submit": (hostile, 1, [[hostile, 1]], 0.0),
        "fetch": (hostile, 1, 0.0, 0),
        "num_queues": (),
        "num_tasks": (),
        "get_stats": (),
        "register_worker": (hostile, 1),
        "exchange": (hostile, [[1, 1, hostile, 1]], 1, 0.0),
        "heartbeat": (hostile,),
        "unregister_worker": (hostile,),
    }
    proxy = _raw_proxy(uri)
    try:
        for method, args in calls.items():
            with pytest.raises(PermissionError):
                getattr(proxy, method)(*args)
    finally:
        proxy._pyroRelease()  # type: ignore[attr-defined]
    assert not sentinel.exists()
    pyro_cluster.start_workers("fortress", 1)
    with client(pyro_cluster, "fortress") as dispatcher:
        assert list(dispatcher.execute([square(6)])) == [36]
    assert not sentinel.exists()


def test_a_connection_without_the_papyros_handshake_is_refused(pyro_cluster: Cluster) -> None:
    import Pyro5.api
    import Pyro5.errors

    _, uri = pyro_cluster.start_dispatcher("strict")
    proxy = Pyro5.api.Proxy(uri)
    with pytest.raises(Pyro5.errors.CommunicationError, match="handshake"):
        proxy._pyroBind()
    proxy._pyroRelease()


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the peer sends before it closes the connection (it must close it)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def _address(uri: str) -> tuple[str, int]:
    host, port = uri.rsplit("@", 1)[1].rsplit(":", 1)
    return host, int(port)


def test_garbage_and_oversized_messages_are_refused_and_logged(pyro_cluster: Cluster) -> None:
    _, uri = pyro_cluster.start_dispatcher("picky", "--max-message-size", str(5 * 1024 * 1024))
    address = _address(uri)
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n" + os.urandom(200))
        reply = _read_until_closed(sock)
    assert b"papyros.dispatcher" not in reply
    # The header of a well-formed 10 MB connect message, over the 5 MiB cap.
    import Pyro5.protocol

    message = Pyro5.protocol.SendingMessage(Pyro5.protocol.MSG_CONNECT, 0, 1, 3, b"x" * 10_000_000)
    header = message.data[: Pyro5.protocol._header_size]
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(header)
        reply = _read_until_closed(sock)
    assert b"papyros.dispatcher" not in reply
    wait_until(
        lambda: pyro_cluster.logs().count("refused a connection") >= 2,
        what="both refusals to be logged",
    )
    pyro_cluster.start_workers("picky", 1)
    with client(pyro_cluster, "picky") as dispatcher:
        assert list(dispatcher.execute([square(7)])) == [49]


# ------------------------------------------------------------ the commands


def _run(
    *args: str, timeout: float = 60, cwd: Path | None = None, **variables: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**environment(), **variables},
    )


def _run_client(
    script: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a client script in a process of its own, from the repository (where the
    workers find ``tests.tasks`` too), with the test deployments' secret by default."""
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=environment() if env is None else env,
        timeout=120,
    )


def _one_line_failure(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode != 0, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_big_batches_travel_in_calls_of_bounded_size(pyro_cluster: Cluster) -> None:
    # 24 MB each way, through a dispatcher that refuses any message over 5 MiB: every
    # submit, assignment, result hand-back and fetch must be split into smaller calls.
    pyro_cluster.start_dispatcher("bulk", "--max-message-size", str(5 * 1024 * 1024))
    pyro_cluster.start_workers("bulk", 2)
    payloads = [bytes([i]) * 1_000_000 for i in range(24)]
    with client(pyro_cluster, "bulk") as dispatcher:
        results = list(dispatcher.execute((identity(p) for p in payloads), ordered=True))
        assert results == payloads
        with dispatcher.make_queue() as queue:
            for payload in payloads:
                queue.push(identity(payload))
            assert sorted(queue.pop(30) for _ in payloads) == payloads
            # Payloads are encoded call by call: one that cannot be is still refused whole.
            with pytest.raises(papyros.SerializationError, match="argument 0"):
                queue.push(identity(threading.Lock()))
        with pytest.raises(papyros.SerializationError, match="argument 0"):
            list(dispatcher.execute([*(identity(p) for p in payloads), identity(threading.Lock())]))
        assert sorted(dispatcher.execute(identity(p) for p in payloads[:2])) == payloads[:2]


def test_a_task_or_result_over_the_message_cap_is_that_task_s_error(
    pyro_cluster: Cluster,
) -> None:
    pyro_cluster.start_dispatcher("capped", "--max-message-size", str(5 * 1024 * 1024))
    pyro_cluster.start_workers("capped", 2)
    too_big = 6 * 1024 * 1024
    with client(pyro_cluster, "capped") as dispatcher:
        wait_until(lambda: len(worker_pids(dispatcher)) == 2, what="two workers")
        workers = worker_pids(dispatcher)
        with dispatcher.make_queue() as queue:
            queue.push(square(2))
            with pytest.raises(papyros.SerializationError, match="max-message-size"):
                queue.push(identity(b"x" * too_big))
            queue.push(square(3))  # The queue, and what it holds, are intact.
            assert sorted([queue.pop(30), queue.pop(30)]) == [4, 9]
        outcomes: list[object] = []
        results = dispatcher.execute(
            [square(1), identity(b"x" * too_big), call(bytes, too_big), square(2)], ordered=True
        )
        while True:
            try:
                outcomes.append(next(results))
            except papyros.SerializationError as exc:
                outcomes.append("bigger than a message" if "max-message-size" in str(exc) else exc)
            except StopIteration:
                break
        assert outcomes == [1, "bigger than a message", "bigger than a message", 4]
        # In a chunk, only the results that do not fit fail: the biggest first, then as
        # many as the rest of the chunk's need to fit in one message.
        half = 3 * 1024 * 1024
        chunk = [square(1), call(bytes, too_big), call(bytes, half), call(bytes, half), square(2)]
        outcomes.clear()
        results = dispatcher.execute(chunk, ordered=True, chunksize=5)
        for _ in chunk:  # Each task has one outcome.
            try:
                outcome = next(results)
            except papyros.SerializationError as exc:
                why = str(exc) if "max-message-size" in str(exc) else "another reason"
                outcomes.append("with the rest" if "with the rest of" in why else why[:40])
            else:
                outcomes.append(len(outcome) if isinstance(outcome, bytes) else outcome)
        alone = "the result of this task pickles to 6,291"
        assert outcomes == [1, alone, "with the rest", half, 4]
        assert worker_pids(dispatcher) == workers  # No worker was lost over it.


def test_results_that_fit_alone_but_not_together_travel_in_separate_messages(
    pyro_cluster: Cluster,
) -> None:
    pyro_cluster.start_dispatcher("roomy", "--max-message-size", str(5 * 1024 * 1024))
    pyro_cluster.start_workers("roomy", 1)
    size = 3 * 1024 * 1024  # Two of them are more than a message may carry.
    with client(pyro_cluster, "roomy") as dispatcher:
        wait_until(lambda: len(worker_pids(dispatcher)) == 1, what="a worker")
        [before] = dispatcher.get_stats()["workers"]  # type: ignore[attr-defined]
        results = dispatcher.execute([call(bytes, size), call(bytes, size)], timeout=60)
        assert [len(result) for result in results] == [size, size]
        [after] = dispatcher.get_stats()["workers"]  # type: ignore[attr-defined]
        # Its worker kept its connection (it did not have to join again, as a new worker).
        assert after["id"] == before["id"]
        assert after["tasks_done"] == 2


def test_bad_worker_counts_fail_in_one_line() -> None:
    _one_line_failure(_run("workers", "-n", "0"), "at least 1")
    _one_line_failure(_run("workers", "-n", "abc"), "'abc'")


def test_a_tls_file_that_cannot_be_read_fails_in_one_line(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    for args in (["nameserver", "--port", "0"], ["dispatcher"], ["workers", "-n", "1"], ["status"]):
        done = _run(*args, "--tls-cert", missing, timeout=30)
        _one_line_failure(done, f"cannot read the TLS certificate {missing}")
    with pytest.raises(papyros.ConfigurationError, match=f"TLS CA bundle {missing}"):
        papyros.get_dispatcher("pyro", tls_ca=missing)


def test_tls_is_off_again_when_the_next_connection_has_no_tls_files(tmp_path: Path) -> None:
    from Pyro5 import config as pyro_config

    from papyros.pyro._common import configure_pyro

    cert = tmp_path / "cert.pem"
    cert.write_text("a certificate\n")  # Only read when a connection is made.
    configure_pyro(tls_cert=str(cert))
    assert pyro_config.SSL
    configure_pyro()
    assert not pyro_config.SSL


def test_a_dispatcher_that_does_not_answer_in_time_is_said_so() -> None:
    import Pyro5.errors

    from papyros.pyro._common import Peer

    peer = Peer("PYRO:papyros.dispatcher@127.0.0.1:9", b"s" * 32, "client")
    with pytest.raises(papyros.CommunicationError, match="did not answer in time"):
        peer._translate(Pyro5.errors.TimeoutError("receiving: timeout"))
    with pytest.raises(TimeoutError, match="still full") as info:
        peer._translate(TimeoutError("still full"))  # The dispatcher's own: left as it is.
    assert not isinstance(info.value, papyros.PapyrosError)


def test_a_port_in_use_fails_in_one_line(pyro_cluster: Cluster) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _run("dispatcher", "--port", str(port), "--ns-port", str(pyro_cluster.ns_port))
    _one_line_failure(done, "cannot listen", str(port))


def test_a_second_dispatcher_of_a_running_group_is_refused(pyro_cluster: Cluster) -> None:
    pyro_cluster.start_dispatcher("twice")
    done = _run("dispatcher", "--group", "twice", "--ns-port", str(pyro_cluster.ns_port))
    _one_line_failure(done, "group 'twice' is running already")
    pyro_cluster.start_workers("twice", 1)
    with client(pyro_cluster, "twice") as dispatcher:  # The first one still has the name.
        assert list(dispatcher.execute([square(3)], timeout=30)) == [9]


def test_an_unreachable_name_server_fails_in_one_line() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    # Where it was looked for, with Pyro5's default host filled in.
    where = f"name server at localhost:{port}"
    _one_line_failure(_run("dispatcher", "--ns-port", str(port)), where)
    _one_line_failure(_run("status", "--ns-port", str(port)), where)
    start = time.monotonic()
    with pytest.raises(papyros.CommunicationError, match="name server"):
        papyros.get_dispatcher("pyro", ns_port=port)
    assert time.monotonic() - start < 20


def test_a_name_server_that_does_not_answer_fails_in_bounded_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # It accepts connections (the kernel does, for a listening socket) and says nothing,
    # as a stopped name server would.
    from papyros.pyro import _common

    monkeypatch.setattr(_common, "NS_TIMEOUT", 1.0)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(papyros.CommunicationError, match="name server"):
            papyros.get_dispatcher("pyro", ns_port=port)
        assert time.monotonic() - start < 10


def test_a_bad_configuration_leaves_the_name_server_alone(tmp_path: Path) -> None:
    # It reads no papyros configuration: neither a bad papyros.toml nor a bad variable.
    (tmp_path / "papyros.toml").write_text("bogus = 1\n")
    process = subprocess.Popen(
        command("nameserver", "--port", "0"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**environment(), "PAPYROS_NS_PORT": "abc"},
    )
    try:
        read_line(process, r"ready at", 30)
    finally:
        assert stop(process) == 0


def test_a_bad_pyro5_variable_fails_each_command_in_one_line() -> None:
    for args in (["nameserver", "--port", "0"], ["dispatcher"], ["workers"], ["status"]):
        _one_line_failure(_run(*args, PYRO_NS_PORT="abc"), args[0], "PYRO_NS_PORT=abc")


def test_a_client_of_a_group_without_dispatcher_gets_a_clear_error(
    pyro_cluster: Cluster,
) -> None:
    with pytest.raises(papyros.CommunicationError, match="start-papyros dispatcher"):
        client(pyro_cluster, "nobody-home")


def test_status_lists_the_workers(pyro_cluster: Cluster) -> None:
    pyro_cluster.start_dispatcher("watched")
    pyro_cluster.start_workers("watched", 2)
    with client(pyro_cluster, "watched") as dispatcher:
        list(dispatcher.execute(square(i) for i in range(100)))
        wait_until(lambda: len(worker_pids(dispatcher)) == 2, what="two workers")
        pids = worker_pids(dispatcher)
    done = _run("status", "--group", "watched", "--ns-port", str(pyro_cluster.ns_port))
    assert done.returncode == 0, done.stderr
    assert "workers: 2" in done.stdout
    for pid in pids:
        assert f"pid {pid}" in done.stdout
    assert "tasks done 100" in done.stdout or "tasks done: 100" in done.stdout


def test_workers_stop_cleanly_on_sigterm_and_sigint(pyro_cluster: Cluster) -> None:
    pyro_cluster.start_dispatcher("tidy")
    for sig in (signal.SIGTERM, signal.SIGINT):
        workers = pyro_cluster.start_workers("tidy", 2)
        with client(pyro_cluster, "tidy") as dispatcher:
            wait_until(lambda: len(worker_pids(dispatcher)) == 2, what="two workers")
            children = psutil.Process(workers.pid).children()
            workers.send_signal(sig)
            assert workers.wait(15) == 0
            _, alive = psutil.wait_procs(children, timeout=10)
            assert not alive
        stop(workers)


def test_workers_stop_cleanly_when_their_whole_process_group_gets_sigterm(
    pyro_cluster: Cluster, tmp_path: Path
) -> None:
    # As systemd and GNU timeout stop a service: SIGTERM to each process of its group.
    # Each worker gets it twice, the group's and then its manager's.
    pyro_cluster.start_dispatcher("group-stop")
    ns_port = str(pyro_cluster.ns_port)
    errors = tmp_path / "workers.err"
    with errors.open("w") as stderr:
        manager = subprocess.Popen(
            command("workers", "-n", "4", "--group", "group-stop", "--ns-port", ns_port),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=environment(),
            start_new_session=True,  # A process group of its own, as under systemd.
        )
    try:
        read_line(manager, r"starting 4 workers", 30)
        with client(pyro_cluster, "group-stop") as dispatcher:
            wait_until(lambda: len(worker_pids(dispatcher)) == 4, what="four workers")
        children = psutil.Process(manager.pid).children(recursive=True)
        os.killpg(manager.pid, signal.SIGTERM)
        assert manager.wait(15) == 0
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive
    finally:
        stop(manager)
    assert "Traceback" not in errors.read_text(), errors.read_text()


def test_workers_that_stop_cleanly_are_logged_as_stopped_not_lost(pyro_cluster: Cluster) -> None:
    pyro_cluster.start_dispatcher("tidy")
    workers = pyro_cluster.start_workers("tidy", 2)
    with client(pyro_cluster, "tidy") as dispatcher:
        wait_until(lambda: len(worker_pids(dispatcher)) == 2, what="both workers to join")
        stop(workers)  # SIGTERM to the manager, as a service manager stops it.
        wait_until(lambda: not worker_pids(dispatcher), what="both workers to leave")
    logs = pyro_cluster.logs()
    assert logs.count("; 0 of its units were dispatched again") == 2, logs
    assert logs.count(" stopped; 0 of its units") == 2, logs
    assert "lost its connection" not in logs, logs


def test_a_worker_stops_at_its_first_sigterm_and_exits_cleanly_despite_more(
    pyro_cluster: Cluster, capfd: pytest.CaptureFixture[str]
) -> None:
    pyro_cluster.start_dispatcher("insistent")
    context = multiprocessing.get_context("spawn")
    reader, writer = context.Pipe(duplex=False)
    options = WorkerOptions("insistent", ns_port=pyro_cluster.ns_port)
    worker = context.Process(target=worker_main, args=(options, writer))
    worker.start()
    writer.close()
    assert worker.pid is not None
    with reader:
        assert reader.poll(30), "the worker did not join its dispatcher"
        reader.recv()
    with client(pyro_cluster, "insistent") as dispatcher:
        assert list(dispatcher.execute([square(3)])) == [9]  # It is at work.
    # SIGTERM after SIGTERM until it is gone: they land everywhere on its way out.
    deadline = time.monotonic() + 15
    while worker.exitcode is None and time.monotonic() < deadline:
        os.kill(worker.pid, signal.SIGTERM)
        worker.join(0.002)
    if worker.exitcode is None:
        worker.kill()
        worker.join()
    err = capfd.readouterr().err
    assert worker.exitcode == 0, err
    assert "Traceback" not in err, err


@pytest.mark.parametrize("piece", ["dispatcher", "workers"])
def test_a_command_stops_cleanly_however_often_it_is_interrupted(
    pyro_cluster: Cluster, piece: str
) -> None:
    process, _ = pyro_cluster.start_dispatcher("hasty")
    if piece == "workers":
        process = pyro_cluster.start_workers("hasty", 1)
    # Ctrl-C after Ctrl-C until it is gone: they land everywhere on its way out.
    deadline = time.monotonic() + 15
    while process.poll() is None and time.monotonic() < deadline:
        process.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(0.002)
    assert stop(process) == 0, pyro_cluster.logs()
    assert "Traceback" not in pyro_cluster.logs(), pyro_cluster.logs()


# ------------------------------------------------------------ the README and TLS

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end != -1 else len(text)]


def _blocks(section: str, language: str) -> list[list[str]]:
    return [
        [line for line in block.split("\n", 1)[1].splitlines() if line.strip()]
        for block in section.split("```")[1::2]
        if block.startswith(language + "\n")
    ]


def _argv(line: str) -> list[str]:
    argv = shlex.split(line.split("#", 1)[0])
    if argv[0] == "start-papyros":  # As installed, wherever the scripts went.
        scripts = Path(sysconfig.get_path("scripts"))
        argv[0] = shutil.which("start-papyros") or str(scripts / "start-papyros")
    elif argv[0] == "python":
        argv[0] = sys.executable
    return argv


def test_the_readme_distributed_quickstart_works_verbatim(tmp_path: Path) -> None:
    section = _section((REPO / "README.md").read_text(), "## Distributed quickstart")
    [commands] = _blocks(section, "sh")
    [expected_output] = _blocks(section, "text")
    assert len(commands) == 4
    env = environment()
    env["PYRO_NS_PORT"] = str(_free_port())  # Not 9090: tests use ports the OS picks.
    ready = [r"ready at", r"ready at", r"starting \d+ workers"]
    processes: list[subprocess.Popen[str]] = []
    try:
        for line, pattern in zip(commands[:3], ready, strict=False):
            with (tmp_path / f"{len(processes)}.log").open("w") as log:
                process = subprocess.Popen(
                    _argv(line), cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True, env=env
                )
            processes.append(process)
            read_line(process, pattern, 30)
        done = subprocess.run(
            _argv(commands[3]), cwd=REPO, capture_output=True, text=True, env=env, timeout=120
        )
        assert done.returncode == 0, done.stderr
        client_command = commands[3].split("#", 1)[0].strip()
        assert [f"$ {client_command}", *done.stdout.splitlines()] == expected_output
    finally:
        for process in reversed(processes):
            assert stop(process) == 0


TLS_CLIENT = """
import sys, papyros
from tests.tasks import square
cert, key, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
with papyros.PyroTaskDispatcher.get_proxy(
    "tls", ns_port=port, tls_cert=cert, tls_key=key, tls_ca=cert
) as dispatcher:
    print(sum(dispatcher.execute(square(i) for i in range(100))))
"""


CONFIGURED_CLIENT = """
import sys, papyros
from tests.tasks import hold_gil, square
with papyros.get_dispatcher(group="tls") as dispatcher:
    print(sum(dispatcher.execute(square(i) for i in range(100))))
    # Three leases long: the workers' manager vouches for its worker, over TLS too.
    queue = dispatcher.make_queue()
    queue.push(hold_gil(3, sys.argv[1]))
    assert queue.pop(timeout=60) == 3
"""


def test_tls_by_the_documented_recipe(tmp_path: Path) -> None:
    recipe = _blocks((REPO / "docs" / "distributed.md").read_text(), "sh")[0]
    openssl = " ".join(line.rstrip("\\").strip() for line in recipe[:3])
    subprocess.run(
        shlex.split(openssl.replace("$(hostname)", "localhost")),
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=60,
    )
    cert, key = str(tmp_path / "papyros-cert.pem"), str(tmp_path / "papyros-key.pem")
    tls = ["--tls-cert", cert, "--tls-key", key, "--tls-ca", cert]
    env = environment()
    # The same files as settings of the configuration, instead of options or arguments.
    configured = {**env, "PAPYROS_TLS_CERT": cert, "PAPYROS_TLS_KEY": key, "PAPYROS_TLS_CA": cert}
    processes: list[subprocess.Popen[str]] = []

    def start(*args: str, options: list[str] = tls) -> subprocess.Popen[str]:
        with (tmp_path / f"{len(processes)}.log").open("w") as log:
            process = subprocess.Popen(
                command(*args, *options),
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env if options else configured,
            )
        processes.append(process)
        return process

    try:
        ns = start("nameserver", "--port", "0")
        port = read_line(ns, r"@127\.0\.0\.1:(\d+)", 30).group(1)
        group = ["--group", "tls", "--ns-port", port, "--lease", "1"]
        read_line(start("dispatcher", *group), "ready at", 30)
        read_line(start("workers", "-n", "1", *group, options=[]), "workers", 30)
        by_code = _run_client(TLS_CLIENT, cert, key, port)
        by_configuration = _run_client(
            CONFIGURED_CLIENT,
            str(tmp_path / "runs"),
            env={**configured, "PAPYROS_BACKEND": "pyro", "PAPYROS_NS_PORT": port},
        )
        for done in (by_code, by_configuration):
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == str(sum(i * i for i in range(100)))
        assert len(pids_in(tmp_path / "runs")) == 1  # Not taken for dead and run again.
        # Without TLS, nobody gets in: not even to the name server.
        with pytest.raises(papyros.CommunicationError):
            papyros.get_dispatcher("pyro", group="tls", ns_port=int(port))
    finally:
        for process in reversed(processes):
            stop(process)


# ------------------------------------------------------------ units workers cannot read

CLIENT_ONLY_TASKS = """
import papyros


@papyros.Task.subclass()
def double(x):
    return 2 * x
"""


def test_a_unit_the_workers_cannot_unpickle_fails_its_tasks_not_the_workers(
    pyro_cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A task class from a module that exists in this client only: workers cannot import it.
    path = tmp_path / "client_only_tasks.py"
    path.write_text(CLIENT_ONLY_TASKS)
    spec = importlib.util.spec_from_file_location("client_only_tasks", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)

    pyro_cluster.start_dispatcher("unreadable")
    pyro_cluster.start_workers("unreadable", 2)
    with client(pyro_cluster, "unreadable") as dispatcher:
        wait_until(lambda: len(worker_pids(dispatcher)) == 2, what="two workers")
        workers = {worker["id"] for worker in dispatcher.get_stats()["workers"]}  # type: ignore[attr-defined]
        tasks = [module.double(1), module.double(2), square(2), square(3)]
        results = dispatcher.execute(tasks, ordered=True, chunksize=2)
        for _ in range(2):
            with pytest.raises(papyros.SerializationError, match="No module named") as info:
                next(results)
            assert "could not unpickle" in str(info.value)
            assert "client_only_tasks" in str(info.value)
        assert list(results) == [4, 9]
        # The same workers, still registered: none dropped its connection over it.
        assert {worker["id"] for worker in dispatcher.get_stats()["workers"]} == workers  # type: ignore[attr-defined]


def _in_remote_call(thread: threading.Thread) -> bool:
    """Whether ``thread`` is inside a Pyro5 call (waiting for its reply, as a long-poll does)."""
    frame = sys._current_frames().get(thread.ident or 0)
    while frame is not None:
        if frame.f_code.co_name == "_pyroInvoke":
            return True
        frame = frame.f_back
    return False


@pytest.mark.parametrize("waiting_in", ["pop", "next"])
def test_close_from_another_thread_ends_a_wait_with_closed_dispatcher_error(
    pyro_cluster: Cluster, waiting_in: str
) -> None:
    pyro_cluster.start_dispatcher("closing")  # No workers: nothing ends the wait but close().
    dispatcher = client(pyro_cluster, "closing")
    errors: list[BaseException] = []

    def consumer() -> None:
        try:
            if waiting_in == "pop":
                dispatcher.make_queue().pop()
            else:
                next(dispatcher.execute([identity(1)]))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=consumer)
    thread.start()
    wait_until(lambda: _in_remote_call(thread), what="the consumer to wait in a remote call")
    closed_at = time.monotonic()
    dispatcher.close()
    thread.join(30)
    assert not thread.is_alive()
    assert [type(error) for error in errors] == [papyros.ClosedTaskDispatcherError], errors
    # At once: not after the long-poll the consumer was in ends on its own.
    assert time.monotonic() - closed_at < 2.0
