"""``start-papyros demo``: factorise a range of numbers on the configured backend."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import papyros
from papyros.errors import PapyrosError

__all__ = ["add_parser", "factorize", "run"]


@papyros.Task.subclass()
def factorize(n: int) -> tuple[int, list[int]]:
    """Return ``(n, the prime factors of n)``, by trial division."""
    factors = []
    remaining = n
    divisor = 2
    while divisor * divisor <= remaining:
        while remaining % divisor == 0:
            factors.append(divisor)
            remaining //= divisor
        divisor += 1 if divisor == 2 else 2
    if remaining > 1 or not factors:
        factors.append(remaining)
    return n, factors


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "demo",
        help="factorise a range of numbers in parallel and print the throughput",
        description=(
            "Factorise the numbers 1..N with papyros on the configured backend "
            "(default: local processes, one per CPU) and print the throughput."
        ),
    )
    parser.add_argument("-n", "--tasks", type=int, default=200_000, help="N (default: %(default)s)")
    parser.add_argument("-b", "--backend", help="dummy, thread, process, ... (default: configured)")
    parser.add_argument("-w", "--workers", type=int, help="workers (default: one per CPU)")
    parser.add_argument(
        "-c", "--chunksize", type=int, default=1000, help="tasks per unit (default: %(default)s)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    for option, value, least in (("--tasks", args.tasks, 1), ("--chunksize", args.chunksize, 1)):
        if value < least:
            print(f"start-papyros demo: {option} must be at least {least}", file=sys.stderr)
            return 2
    try:
        dispatcher = papyros.get_dispatcher(args.backend, workers=args.workers)
    except (PapyrosError, ValueError) as exc:
        print(f"start-papyros demo: {exc}", file=sys.stderr)
        return 2
    with dispatcher:
        print(f"Factorising 1..{args.tasks:,} on {dispatcher!r}")
        start = time.perf_counter()
        most: tuple[int, list[int]] = (1, [1])
        count = 0
        tasks = (factorize(n) for n in range(1, args.tasks + 1))
        for n, factors in dispatcher.execute(tasks, chunksize=args.chunksize):
            count += 1
            if len(factors) > len(most[1]) or (len(factors) == len(most[1]) and n < most[0]):
                most = (n, factors)
        elapsed = time.perf_counter() - start
    product = " x ".join(
        f"{prime}^{most[1].count(prime)}" if most[1].count(prime) > 1 else str(prime)
        for prime in sorted(set(most[1]))
    )
    print(f"{count:,} numbers factorised in {elapsed:.2f} s: {count / elapsed:,.0f} tasks/s")
    print(f"The smallest with the most prime factors: {most[0]:,} = {product}")
    return 0
