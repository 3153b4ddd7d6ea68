"""``start-papyros dispatcher | workers | nameserver | status``: the distributed backend."""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.connection
import signal
import sys
import threading
import time
from typing import Any

from papyros.cli._logging import add_logging_options, setup_logging
from papyros.cli._options import (
    add_group_options,
    apply_configuration,
    message_size,
    non_negative_int,
    port,
    positive_int,
    seconds,
)
from papyros.errors import PapyrosError

__all__ = ["add_parsers"]

# A worker that dies sooner than this after its start counts toward a crash loop.
_QUICK_DEATH = 5.0
_MAX_RESPAWN_DELAY = 30.0


def add_parsers(commands: Any) -> None:
    parser = commands.add_parser(
        "dispatcher",
        help="run the dispatcher of a group, for remote workers and clients",
        description=(
            "Run a papyros dispatcher and register it in the Pyro5 name server under "
            "the group's name. Workers (start-papyros workers) and clients "
            "(papyros.get_dispatcher('pyro')) of the same group find it there."
        ),
    )
    add_group_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    parser.add_argument("--port", type=port, default=0, help="port (default: one the OS picks)")
    parser.add_argument(
        "--size", type=non_negative_int, default=0, help="bound on pending tasks (0: none)"
    )
    parser.add_argument(
        "--lease",
        type=seconds,
        default=10.0,
        help="seconds of silence before a worker is presumed dead (%(default)s)",
    )
    parser.add_argument(
        "--max-attempts",
        type=positive_int,
        default=3,
        help="dispatches of a task before a lost worker is its outcome (%(default)s)",
    )
    parser.add_argument(
        "--max-message-size",
        type=message_size,
        default=256 * 1024 * 1024,
        help="the largest message accepted, in bytes, at least 5 MiB (%(default)s)",
    )
    add_logging_options(parser)
    parser.set_defaults(run=run_dispatcher)

    parser = commands.add_parser(
        "workers",
        help="start worker processes for a group, and keep them running",
        description=(
            "Start NUM worker processes that serve the dispatcher of a group, and "
            "replace any that dies. Workers may start before their dispatcher and "
            "reconnect by themselves when it restarts. Ctrl-C or SIGTERM stops them all."
        ),
    )
    add_group_options(parser)
    parser.add_argument(
        "-n", "--num", type=positive_int, help="how many workers (default: one per CPU)"
    )
    parser.add_argument(
        "--lease", type=seconds, default=10.0, help="the dispatcher's lease (%(default)s)"
    )
    add_logging_options(parser)
    parser.set_defaults(run=run_workers)

    parser = commands.add_parser(
        "nameserver",
        help="run a Pyro5 name server (bound to 127.0.0.1 by default)",
        description="Run a Pyro5 name server, without broadcast.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    parser.add_argument(
        "--port", type=port, help="port (default: $PYRO_NS_PORT, else 9090; 0: one the OS picks)"
    )
    parser.add_argument("--tls-cert", default="", help="PEM certificate: enables TLS")
    parser.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-ca", default="", help="PEM CA bundle to verify peers with")
    add_logging_options(parser)
    parser.set_defaults(run=run_nameserver)

    parser = commands.add_parser(
        "status",
        help="print a dispatcher's workers, queues and throughput",
        description="Print the workers, queues, pending and in-flight tasks of a group.",
    )
    add_group_options(parser)
    parser.set_defaults(run=run_status)


def _fail(command: str, message: object) -> int:
    print(f"start-papyros {command}: {message}", file=sys.stderr, flush=True)
    return 1


def _stop_on_sigterm() -> None:
    """Make SIGTERM end the command like Ctrl-C does."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _ignore_interrupts() -> None:
    """While the command stops (in bounded time), more Ctrl-Cs or SIGTERMs would only
    break its clean-up with a traceback: they are ignored from now on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def run_dispatcher(args: argparse.Namespace) -> int:
    try:
        apply_configuration(args)
        setup_logging(args.log_level, args.log_file)
        from papyros.pyro._common import keep_freed_buffers
        from papyros.pyro.dispatcher import PyroTaskDispatcher

        keep_freed_buffers()
        dispatcher = PyroTaskDispatcher(
            args.size,
            group=args.group,
            host=args.host,
            port=args.port,
            ns_host=args.ns_host,
            ns_port=args.ns_port,
            secret_file=args.secret_file,
            lease=args.lease,
            max_attempts=args.max_attempts,
            max_message_size=args.max_message_size,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_ca=args.tls_ca,
        )
    except (PapyrosError, ImportError, ValueError, OSError) as exc:
        return _fail("dispatcher", exc)
    _stop_on_sigterm()
    try:
        # Said inside the try: a Ctrl-C as soon as it is said stops the dispatcher cleanly.
        print(f"papyros dispatcher of group {args.group!r} ready at {dispatcher.uri}", flush=True)
        dispatcher.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        _ignore_interrupts()
        dispatcher.close()
    return 0


def run_workers(args: argparse.Namespace) -> int:
    from papyros.dispatchers._local import available_cpus

    try:
        apply_configuration(args)
        setup_logging(args.log_level, args.log_file)
        from papyros._auth import load_secret
        from papyros.pyro._common import configure_pyro
        from papyros.pyro.worker import WorkerOptions, vouch_for, worker_main

        # Fail now, not in every worker.
        load_secret(args.secret_file)
        configure_pyro(tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca)
    except (PapyrosError, ImportError, ValueError, OSError) as exc:
        return _fail("workers", exc)
    options = WorkerOptions(
        args.group,
        ns_host=args.ns_host,
        ns_port=args.ns_port,
        secret_file=args.secret_file,
        lease=args.lease,
        log_level=args.log_level,
        log_file=args.log_file,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
    )
    count = args.num or available_cpus()
    context = multiprocessing.get_context("spawn")
    workers: dict[int, tuple[multiprocessing.process.BaseProcess, float]] = {}
    # Each worker's pipe, on which it reports its id whenever it registers.
    reports: dict[multiprocessing.connection.Connection, multiprocessing.process.BaseProcess] = {}
    # The worker id of each worker process, by process id: what vouch_for() renews.
    vouched: dict[int, str] = {}
    vouch_stop = threading.Event()
    voucher = threading.Thread(
        target=vouch_for, args=(options, vouched, vouch_stop), name="papyros-voucher", daemon=True
    )
    # Per slot: how many of its workers in a row died soon after starting, and when it
    # may be filled again. A slot whose workers keep dying waits longer each time; the
    # others are filled at once.
    quick_deaths: dict[int, int] = {}
    respawn_at: dict[int, float] = {}
    _stop_on_sigterm()
    voucher.start()
    try:
        print(f"papyros: starting {count} workers for group {args.group!r}", flush=True)
        while True:
            now = time.monotonic()
            for slot in range(count):
                if slot not in workers and respawn_at.get(slot, 0.0) <= now:
                    reader, writer = context.Pipe(duplex=False)
                    process: multiprocessing.process.BaseProcess = context.Process(
                        target=worker_main, args=(options, writer), name=f"papyros-worker-{slot}"
                    )
                    process.start()
                    writer.close()
                    reports[reader] = process
                    workers[slot] = (process, time.monotonic())
            waiting = [respawn_at[slot] for slot in range(count) if slot not in workers]
            timeout = max(0.0, min(waiting) - now) if waiting else None
            sentinels = {process.sentinel: slot for slot, (process, _) in workers.items()}
            for ready in multiprocessing.connection.wait([*sentinels, *reports], timeout):
                if isinstance(ready, multiprocessing.connection.Connection):
                    try:
                        worker_id = ready.recv()
                    except (EOFError, OSError):
                        del reports[ready]
                        ready.close()
                    else:
                        reporter = reports[ready]
                        if reporter.pid is not None and reporter.is_alive():
                            vouched[reporter.pid] = str(worker_id)
                    continue
                slot = sentinels[ready]  # type: ignore[index]
                process, started = workers.pop(slot)
                process.join()
                vouched.pop(process.pid or 0, None)
                lived = time.monotonic() - started
                deaths = quick_deaths.get(slot, 0) + 1 if lived < _QUICK_DEATH else 0
                quick_deaths[slot] = deaths
                delay = min(_MAX_RESPAWN_DELAY, 0.5 * 2 ** (deaths - 1)) if deaths else 0.0
                respawn_at[slot] = time.monotonic() + delay
                print(
                    f"papyros: worker {process.pid} exited with code {process.exitcode}; "
                    f"replacing it{f' in {delay:.1f} s' if deaths else ''}",
                    file=sys.stderr,
                    flush=True,
                )
    except KeyboardInterrupt:
        pass
    finally:
        _ignore_interrupts()
        vouch_stop.set()
        _stop_processes([process for process, _ in workers.values()])
        for reader in reports:
            reader.close()
        voucher.join(5.0)
    return 0


def _stop_processes(processes: list[multiprocessing.process.BaseProcess]) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + 5.0
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def run_nameserver(args: argparse.Namespace) -> int:
    try:
        setup_logging(args.log_level, args.log_file)
        import Pyro5.nameserver  # Reads the PYRO_* variables: a bad one is a ValueError.

        from papyros.pyro._common import configure_pyro

        configure_pyro(
            server=True, tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca
        )
    except ImportError:
        return _fail("nameserver", "needs Pyro5: pip install 'papyros[pyro]'")
    except (PapyrosError, ValueError, OSError) as exc:
        return _fail("nameserver", exc)
    port = Pyro5.config.NS_PORT if args.port is None else args.port  # $PYRO_NS_PORT, else 9090.
    try:
        uri, daemon, _ = Pyro5.nameserver.start_ns(args.host, port, enableBroadcast=False)
    except OSError as exc:
        return _fail("nameserver", f"cannot listen on {args.host}:{port}: {exc}")
    _stop_on_sigterm()
    print(f"papyros: Pyro5 name server ready at {uri}", flush=True)
    try:
        daemon.requestLoop()
    except KeyboardInterrupt:
        pass
    finally:
        daemon.close()
    return 0


def run_status(args: argparse.Namespace) -> int:
    try:
        apply_configuration(args)
        from papyros.pyro.dispatcher import PyroTaskDispatcher

        with PyroTaskDispatcher.get_proxy(
            args.group,
            ns_host=args.ns_host,
            ns_port=args.ns_port,
            secret_file=args.secret_file,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_ca=args.tls_ca,
        ) as dispatcher:
            stats = dispatcher.get_stats()
    except (PapyrosError, ImportError, ValueError) as exc:
        return _fail("status", exc)
    print(f"dispatcher of group {args.group!r} at {dispatcher.uri}, up {stats['uptime']:.0f} s")
    print(
        f"queues: {stats['queues']}  pending tasks: {stats['pending_tasks']}  "
        f"units in flight: {stats['inflight_units']}  tasks done: {stats['tasks_done']}  "
        f"({stats['tasks_per_second']:.1f} tasks/s)"
    )
    print(f"workers: {len(stats['workers'])}")
    for worker in stats["workers"]:
        state = "busy" if worker["busy"] else "idle"
        print(
            f"  {worker['host']:<20} pid {worker['pid']:<8} {state:<5} "
            f"tasks done {worker['tasks_done']}"
        )
    return 0
