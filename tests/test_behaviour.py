"""The dispatcher contract (DESIGN section 3), written once, run on every backend."""

from __future__ import annotations

import gc
import itertools
import os
import threading
import traceback
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import papyros
from papyros.dispatcher import _task_type_of
from tests.conftest import WORKERS, DispatcherFactory
from tests.stateful_tasks import Greeting, Scale, SlottedScale
from tests.tasks import (
    Blob,
    BrokenRun,
    FrozenError,
    Scaled,
    WithFunctionMethod,
    add,
    annotated_failure,
    blob_size,
    cube,
    fail_if_odd,
    identity,
    interrupt,
    lines,
    make_blob,
    raise_frozen,
    record,
    sleep_then,
    square,
    stop_at,
)
from tests.thread_tasks import (
    raise_base_exception,
    raise_base_exception_in_time,
    raise_or_square,
)

COMBINATIONS = [
    pytest.param(ordered, chunksize, id=f"{'ordered' if ordered else 'unordered'}-chunk{chunksize}")
    # 300: a chunk bigger than the slices that execute pulls its input in.
    for ordered, chunksize in itertools.product([False, True], [1, 3, 100, 300])
]


# ------------------------------------------------------------ every task, one outcome


def _drain(results: Iterator[object], error: type[Exception]) -> list[object]:
    """Every outcome, by ``next()``: a result, or the text of an ``error`` a task raised."""
    seen: list[object] = []
    while True:
        try:
            seen.append(next(results))
        except error as exc:
            seen.append(str(exc))
        except StopIteration:
            return seen


@pytest.mark.parametrize(("ordered", "chunksize"), COMBINATIONS)
def test_execute_yields_every_result_once(
    dispatcher: papyros.TaskDispatcher, ordered: bool, chunksize: int
) -> None:
    results = list(
        dispatcher.execute((square(i) for i in range(500)), ordered=ordered, chunksize=chunksize)
    )
    expected = [i * i for i in range(500)]
    if ordered:
        assert results == expected
    else:
        assert sorted(results) == expected


def test_ordered_results_follow_input_order_whatever_the_durations(
    dispatcher: papyros.TaskDispatcher,
) -> None:
    # Early tasks take longer than late ones, so they finish out of order.
    durations = [0.05, 0.0, 0.03, 0.0, 0.01, 0.0] * 4
    tasks = (sleep_then(seconds, i) for i, seconds in enumerate(durations))
    assert list(dispatcher.execute(tasks, ordered=True)) == list(range(len(durations)))


def test_unordered_chunk_results_come_whole_and_in_input_order(
    dispatcher: papyros.TaskDispatcher,
) -> None:
    results = list(dispatcher.execute((identity(i) for i in range(100)), chunksize=10))
    assert sorted(results) == list(range(100))
    for start in range(0, 100, 10):
        chunk = results[start : start + 10]
        assert chunk == list(range(chunk[0], chunk[0] + 10)), results


def test_many_clients_each_get_only_their_own_results(
    dispatcher: papyros.TaskDispatcher,
) -> None:
    outcomes: dict[int, list[object]] = {}

    def client(name: int) -> None:
        with dispatcher.make_queue() as queue:
            for i in range(200):
                queue.push(identity((name, i)))
            outcomes[name] = [queue.pop(timeout=30) for _ in range(200)]

    threads = [threading.Thread(target=client, args=(name,)) for name in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == list(range(6))
    for name, results in outcomes.items():
        assert sorted(results) == [(name, i) for i in range(200)]  # type: ignore[comparison-overlap]


def test_concurrent_execute_calls_are_independent(dispatcher: papyros.TaskDispatcher) -> None:
    first = dispatcher.execute((identity(i) for i in range(300)), ordered=True)
    second = dispatcher.execute((identity(-i) for i in range(300)), chunksize=7)
    pairs = list(zip(first, second, strict=False))
    assert [a for a, _ in pairs] == list(range(300))
    assert sorted(b for _, b in pairs) == sorted(-i for i in range(300))


# ------------------------------------------------------------ exceptions are values


@pytest.mark.parametrize(("ordered", "chunksize"), COMBINATIONS)
def test_a_failing_task_does_not_break_the_iteration(
    dispatcher: papyros.TaskDispatcher, ordered: bool, chunksize: int
) -> None:
    results = dispatcher.execute(
        (fail_if_odd(i) for i in range(50)), ordered=ordered, chunksize=chunksize
    )
    seen = _drain(results, ValueError)
    values = [each for each in seen if isinstance(each, int)]
    errors = [each for each in seen if isinstance(each, str)]
    assert sorted(values) == list(range(0, 50, 2))
    assert sorted(errors) == sorted(f"odd: {i}" for i in range(1, 50, 2))
    if ordered:
        assert values == list(range(0, 50, 2))


@pytest.mark.parametrize("chunksize", [1, 4])
def test_loops_and_next_share_one_stream_of_results(
    dispatcher: papyros.TaskDispatcher, chunksize: int
) -> None:
    results = dispatcher.execute(
        (fail_if_odd(i) for i in range(40)), ordered=True, chunksize=chunksize
    )
    seen: list[object] = []
    while True:
        try:
            for value in results:  # A task's exception ends this loop...
                seen.append(value)
                if value % 8 == 0:
                    seen.append(next(results))  # ...never mind: next() is the same stream.
        except ValueError as exc:
            seen.append(str(exc))
            continue  # ...and a new loop goes on after it.
        break
    expected = [i if i % 2 == 0 else f"odd: {i}" for i in range(40)]
    assert seen == expected
    assert list(results) == []


@pytest.mark.parametrize("chunksize", [1, 4])
def test_the_iterator_that_iter_returns_goes_on_after_a_task_exception(
    dispatcher: papyros.TaskDispatcher, chunksize: int
) -> None:
    it = iter(
        dispatcher.execute((fail_if_odd(i) for i in range(20)), ordered=True, chunksize=chunksize)
    )
    assert _drain(it, ValueError) == [i if i % 2 == 0 else f"odd: {i}" for i in range(20)]


def test_the_iterator_that_iter_returns_goes_on_after_a_timeout(
    concurrent_dispatcher: papyros.TaskDispatcher,
) -> None:
    results = concurrent_dispatcher.execute([sleep_then(1.0, "late")], timeout=0.05)
    it = iter(results)
    with pytest.raises(papyros.TimeoutError):
        next(it)
    results._timeout = None  # The next call may wait as long as it takes.
    assert list(it) == ["late"]


def test_a_task_raising_stop_iteration_ends_no_iteration(
    dispatcher: papyros.TaskDispatcher,
) -> None:
    # StopIteration raised at the consumer would end its loop and lose the results after it.
    results = dispatcher.execute((stop_at(i, 2) for i in range(5)), ordered=True, chunksize=2)
    assert [next(results), next(results)] == [0, 1]
    with pytest.raises(RuntimeError, match="StopIteration"):
        next(results)
    assert list(results) == [3, 4]
    looped = []
    with pytest.raises(RuntimeError, match="StopIteration"):
        looped.extend(dispatcher.map(stop_at, range(5), itertools.repeat(2), ordered=True))
    assert looped == [0, 1]


@pytest.mark.parametrize("chunksize", [1, 3])
def test_a_task_raising_stop_iteration_fails_alike_everywhere(
    dispatcher: papyros.TaskDispatcher, chunksize: int
) -> None:
    # Every way of taking the outcome gets the same error, with the StopIteration's
    # traceback (from the task's own code) in its chain.
    def check(error: BaseException) -> None:
        assert type(error) is RuntimeError
        assert str(error) == "the task raised StopIteration"
        chain = "".join(traceback.format_exception(error))
        assert "StopIteration: 2" in chain
        assert "in stop_at" in chain

    queue = dispatcher.make_queue()
    queue.push(stop_at(2, 2))
    with pytest.raises(RuntimeError) as popped:
        queue.pop(timeout=30)
    check(popped.value)
    queue.close()
    for results in (
        dispatcher.execute([stop_at(i, 2) for i in range(4)], ordered=True, chunksize=chunksize),
        dispatcher.map(stop_at, range(4), itertools.repeat(2), ordered=True, chunksize=chunksize),
    ):
        assert [next(results), next(results)] == [0, 1]
        with pytest.raises(RuntimeError) as raised:
            next(results)
        check(raised.value)
        assert list(results) == [3]


@pytest.mark.parametrize("chunksize", [1, 5])
def test_task_and_traceback_attributes_reach_the_client(
    dispatcher: papyros.TaskDispatcher, chunksize: int
) -> None:
    # In a chunk, the failing task sits between others that run after it too.
    tasks = [identity(1), identity(2), annotated_failure(7), identity(3), identity(4)]
    results = dispatcher.execute(tasks, ordered=True, chunksize=chunksize)
    assert [next(results), next(results)] == [1, 2]
    with pytest.raises(KeyError) as info:
        next(results)
    assert list(results) == [3, 4]
    assert repr(info.value.task) == repr(annotated_failure(7))  # type: ignore[attr-defined]
    traceback = info.value.traceback  # type: ignore[attr-defined]
    assert "annotated_failure" in traceback
    assert "KeyError: 7" in traceback
    # It starts in the task's own code: the frame of papyros's that ran it is not shown.
    assert ", in _run" not in traceback


def test_an_exception_that_refuses_new_attributes_is_still_the_outcome(
    dispatcher: papyros.TaskDispatcher,
) -> None:
    # A frozen dataclass refuses the .task and .traceback that its task's class asks for.
    # On the process backend it cannot be unpickled either (a known limit of frozen
    # dataclass exceptions), so there it arrives as a RemoteTaskError naming it.
    results = dispatcher.execute([identity(1), raise_frozen(7), identity(3)], ordered=True)
    assert next(results) == 1
    with pytest.raises((FrozenError, papyros.RemoteTaskError)) as info:
        next(results)
    assert "FrozenError" in repr(info.value) or isinstance(info.value, FrozenError)
    assert list(results) == [3]
    if isinstance(info.value, FrozenError):
        assert info.value.code == 7
        assert "raise_frozen" in info.value.traceback  # type: ignore[attr-defined]


@pytest.mark.parametrize("chunksize", [1, 3])
def test_a_fault_around_the_tasks_fails_them_and_spares_the_worker(
    dispatcher: papyros.TaskDispatcher, chunksize: int
) -> None:
    results = list(
        _drain(dispatcher.execute([BrokenRun(1), BrokenRun(2)], chunksize=chunksize), RuntimeError)
    )
    assert results == ["broken machinery", "broken machinery"]
    assert list(dispatcher.execute([square(4)], timeout=30)) == [16]


def test_a_task_class_may_have_a_method_named_function(
    dispatcher: papyros.TaskDispatcher,
) -> None:
    assert sorted(dispatcher.map(WithFunctionMethod, [1, 2, 3], timeout=30)) == [2, 4, 6]
    tasks = [WithFunctionMethod(x) for x in range(5)]
    assert list(dispatcher.execute(tasks, ordered=True, chunksize=5, timeout=30)) == [
        0,
        2,
        4,
        6,
        8,
    ]


def test_buffers_pickled_out_of_band_travel_both_ways(dispatcher: papyros.TaskDispatcher) -> None:
    # As NumPy arrays pickle: a PickleBuffer, above the 64 KB of a pickle's frame.
    sizes = [10, 100_000, 3_000_000]
    tasks = [blob_size(Blob(bytearray(size))) for size in sizes]
    assert list(dispatcher.execute(tasks, ordered=True, timeout=60)) == sizes
    blobs = list(dispatcher.execute([make_blob(size) for size in sizes], ordered=True, timeout=60))
    assert blobs == [Blob(bytearray(b"b" * size)) for size in sizes]


@pytest.mark.parametrize("timeout", [float("inf"), 1e12])
def test_an_endless_or_huge_timeout_waits_as_none_does(
    dispatcher: papyros.TaskDispatcher, timeout: float
) -> None:
    assert list(dispatcher.execute([square(3)], timeout=timeout)) == [9]
    with dispatcher.make_queue() as queue:
        queue.push(square(5), timeout=timeout)
        assert queue.pop(timeout=timeout) == 25
        queue.push(square(6))
        assert queue.pop_many(timeout=timeout) == [36]


def test_queue_pop_reraises_the_task_exception(dispatcher: papyros.TaskDispatcher) -> None:
    with dispatcher.make_queue() as queue:
        queue.push(fail_if_odd(3))
        with pytest.raises(ValueError, match="odd: 3"):
            queue.pop(timeout=30)


# ------------------------------------------------------------ the input iterable


def test_a_non_task_item_is_a_type_error_in_its_place(dispatcher: papyros.TaskDispatcher) -> None:
    results = dispatcher.execute([identity(0), "not a task", identity(2)], ordered=True)
    assert next(results) == 0
    with pytest.raises(TypeError, match="not a task"):
        next(results)
    assert next(results) == 2
    with pytest.raises(StopIteration):
        next(results)


@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("chunksize", [1, 4, 300])
def test_an_error_of_the_input_comes_after_every_result_before_it(
    dispatcher: papyros.TaskDispatcher, ordered: bool, chunksize: int
) -> None:
    def tasks() -> Iterator[papyros.Task]:
        for i in range(250):
            yield identity(i)
        raise RuntimeError("the input broke")

    results = dispatcher.execute(tasks(), ordered=ordered, chunksize=chunksize)
    got = [next(results) for _ in range(250)]
    assert sorted(got) == list(range(250))
    with pytest.raises(RuntimeError, match="the input broke"):
        next(results)
    with pytest.raises(StopIteration):
        next(results)
    assert dispatcher.num_queues() == 0


def _mixed_items() -> tuple[list[object], list[object]]:
    """Items in runs that start and end inside chunks of 300, and their expected outcomes.

    Each chunk of 300 mixes them differently: tasks of one argument, then some
    with keyword arguments; tasks of two arguments, then of one (a slice of 128
    each), then another task class; tasks then an item that is not a task; tasks
    of a class with its own ``__init__`` then plain ones.
    """
    items: list[object] = []
    expected: list[object] = []
    for i in range(1200):
        if i < 200:
            items.append(add(i))
            expected.append(i)
        elif i < 300:
            items.append(add(i, y=1000))
            expected.append(i + 1000)
        elif 300 <= i < 428:
            items.append(add(i, i))
            expected.append(2 * i)
        elif 428 <= i < 556:
            items.append(add(i))
            expected.append(i)
        elif 556 <= i < 600:
            items.append(identity(i))
            expected.append(i)
        elif i == 701:
            items.append(f"item {i}")
            expected.append("execute() takes Task objects; got str 'item 701'")
        elif 900 <= i <= 1000:
            items.append(Scale(i, factor=3))
            expected.append(3 * i)
        else:
            items.append(square(i))
            expected.append(i * i)
    return items, expected


@pytest.mark.parametrize("ordered", [False, True])
def test_big_chunks_of_mixed_items_give_each_its_own_outcome(
    dispatcher: papyros.TaskDispatcher, ordered: bool
) -> None:
    items, expected = _mixed_items()
    got = _drain(dispatcher.execute(items, ordered=ordered, chunksize=300), TypeError)
    if ordered:
        assert got == expected
    else:
        assert sorted(map(repr, got)) == sorted(map(repr, expected))


def test_execute_is_lazy_over_an_infinite_input(dispatcher: papyros.TaskDispatcher) -> None:
    pulled = itertools.count()

    def endless() -> Iterator[papyros.Task]:
        for i in itertools.count():
            next(pulled)
            yield identity(i)

    results = dispatcher.execute(endless(), chunksize=5)
    taken = list(itertools.islice(results, 1000))
    results.close()
    assert len(taken) == 1000
    # What was pulled beyond the consumed results is bounded by the window.
    assert next(pulled) < 1000 + 5 * 1000


def test_execute_rejects_bad_arguments(dispatcher: papyros.TaskDispatcher) -> None:
    with pytest.raises(ValueError, match="chunksize"):
        dispatcher.execute([], chunksize=0)
    with pytest.raises(ValueError, match="timeout"):
        dispatcher.execute([], timeout=-1)
    with pytest.raises(ValueError, match="timeout"):
        dispatcher.execute([], timeout=float("nan"))
    with pytest.raises(TypeError, match="ordered must be True or False, not 'no'"):
        dispatcher.execute([], ordered="no")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        dispatcher.execute(42)  # type: ignore[arg-type]
    with dispatcher.make_queue() as queue:
        with pytest.raises(TypeError, match="Task"):
            queue.push(square)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timeout"):
            queue.pop(timeout=float("nan"))
    assert dispatcher.num_queues() == 0


def test_execute_of_nothing_ends_at_once(dispatcher: papyros.TaskDispatcher) -> None:
    assert list(dispatcher.execute([])) == []
    assert dispatcher.num_queues() == 0


# ------------------------------------------------------------ map: arguments in, results out


@pytest.mark.parametrize(("ordered", "chunksize"), COMBINATIONS)
def test_map_runs_the_task_type_on_each_argument(
    dispatcher: papyros.TaskDispatcher, ordered: bool, chunksize: int
) -> None:
    results = list(dispatcher.map(square, range(300), ordered=ordered, chunksize=chunksize))
    assert sorted(results) == [i * i for i in range(300)]
    if ordered:
        assert results == [i * i for i in range(300)]
    assert dispatcher.num_queues() == 0


@pytest.mark.parametrize("chunksize", [1, 4])
def test_map_runs_task_classes_with_their_own_init(
    dispatcher: papyros.TaskDispatcher, chunksize: int
) -> None:
    results = dispatcher.map(Scaled, [1, -2, 3], ordered=True, chunksize=chunksize)
    assert next(results) == 10
    with pytest.raises(ValueError, match="negative: -2"):
        next(results)
    assert list(results) == [30]
    assert list(dispatcher.map(Scaled, [1, 2], [3, 4], ordered=True)) == [3, 8]


def test_map_pairs_several_iterables_up_to_the_shortest(
    dispatcher: papyros.TaskDispatcher,
) -> None:
    results = dispatcher.map(add, range(10), iter(range(100, 106)), ordered=True, chunksize=4)
    assert list(results) == [i + 100 + i for i in range(6)]


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_failures_and_input_errors_come_in_their_place(
    dispatcher: papyros.TaskDispatcher, chunksize: int
) -> None:
    def numbers() -> Iterator[int]:
        yield from range(7)
        raise RuntimeError("the input broke")

    results = dispatcher.map(fail_if_odd, numbers(), ordered=True, chunksize=chunksize)
    seen: list[object] = []
    while True:
        try:
            seen.append(next(results))
        except (ValueError, RuntimeError) as exc:
            seen.append(str(exc))
        except StopIteration:
            break
    assert seen == [0, "odd: 1", 2, "odd: 3", 4, "odd: 5", 6, "the input broke"]


def test_map_is_lazy_over_an_infinite_input(dispatcher: papyros.TaskDispatcher) -> None:
    pulled = itertools.count()

    def endless() -> Iterator[int]:
        for i in itertools.count():
            next(pulled)
            yield i

    with dispatcher.map(identity, endless(), chunksize=5) as results:
        taken = list(itertools.islice(results, 1000))
    assert len(taken) == 1000
    assert next(pulled) < 1000 + 5 * 1000
    assert dispatcher.num_queues() == 0


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_runs_plain_functions(dispatcher: papyros.TaskDispatcher, chunksize: int) -> None:
    results = dispatcher.map(cube, [2, "x", 3], ordered=True, chunksize=chunksize)
    assert next(results) == 8
    with pytest.raises(TypeError):
        next(results)  # "x" * "x": the function's exception, in its place.
    assert list(results) == [27]
    offset = 10  # A closure and a builtin travel too (by value, by reference).
    assert list(dispatcher.map(lambda x: x + offset, [1, 2], ordered=True)) == [11, 12]
    assert list(dispatcher.map(divmod, [7, 9], [2, 4], ordered=True)) == [(3, 1), (2, 1)]
    # Mapping a module-level function again reuses its Task type: workers learn it once.
    assert _task_type_of(cube) is _task_type_of(cube)
    assert _task_type_of(divmod) is _task_type_of(divmod)
    assert issubclass(_task_type_of(cube), papyros.Task)


def test_map_keeps_no_closure_alive(dispatcher: papyros.TaskDispatcher) -> None:
    class Data:
        pass

    def closure_over_data() -> tuple[Callable[[int], int], weakref.ref[Data]]:
        data = Data()
        return (lambda x: x + isinstance(data, Data)), weakref.ref(data)

    uses_data, alive = closure_over_data()
    assert _task_type_of(uses_data) is not _task_type_of(uses_data)  # Made anew each time.
    assert list(dispatcher.map(uses_data, [1, 2], ordered=True, chunksize=2)) == [2, 3]
    del uses_data
    gc.collect()
    assert alive() is None  # Nor does the dispatcher (a process one sends its class by value).


def test_map_rejects_bad_arguments(dispatcher: papyros.TaskDispatcher) -> None:
    with pytest.raises(TypeError, match="function or a Task type"):
        dispatcher.map(square(1), [1])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="function or a Task type"):
        dispatcher.map(42, [1])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="at least one iterable"):
        dispatcher.map(square)
    with pytest.raises(ValueError, match="chunksize"):
        dispatcher.map(square, [1], chunksize=0)
    with pytest.raises(TypeError, match="ordered must be True or False"):
        dispatcher.map(square, [1], ordered=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        dispatcher.map(square, 42)  # type: ignore[arg-type]
    assert dispatcher.num_queues() == 0


# ------------------------------------------------------------ timeouts are deadlines


def test_a_timed_out_next_loses_nothing(concurrent_dispatcher: papyros.TaskDispatcher) -> None:
    results = concurrent_dispatcher.execute([sleep_then(1.0, "late")], timeout=0.05)
    with pytest.raises(papyros.TimeoutError):
        next(results)
    with pytest.raises(TimeoutError):  # It is also the builtin TimeoutError.
        next(results)
    results._timeout = None  # The next call may wait as long as it takes.
    assert next(results) == "late"


def test_a_timed_out_pop_loses_nothing(concurrent_dispatcher: papyros.TaskDispatcher) -> None:
    with concurrent_dispatcher.make_queue() as queue:
        queue.push(sleep_then(0.5, "late"))
        with pytest.raises(papyros.TimeoutError):
            queue.pop(timeout=0)
        with pytest.raises(papyros.TimeoutError):
            queue.pop(timeout=0.05)
        assert queue.pop(timeout=30) == "late"


# ------------------------------------------------------------ pop_many


def test_pop_many_returns_what_has_finished(dispatcher: papyros.TaskDispatcher) -> None:
    with dispatcher.make_queue() as queue:
        for i in range(5):
            queue.push(square(i))
        got: list[int] = []
        calls = 0
        while len(got) < 5:  # Bounded by the per-test timeout if pop_many never returns any.
            batch = queue.pop_many(timeout=0)
            got.extend(batch)
            calls += 1
            if not batch:
                got.append(queue.pop(timeout=30))
        assert sorted(got) == [0, 1, 4, 9, 16]
        assert queue.pop_many(timeout=0) == []


def test_pop_many_with_no_limit_waits_for_every_pushed_task(
    dispatcher: papyros.TaskDispatcher,
) -> None:
    with dispatcher.make_queue() as queue:
        for i in range(20):
            queue.push(square(i))
        assert sorted(queue.pop_many(timeout=None)) == [i * i for i in range(20)]
        assert queue.pop_many(timeout=None) == []


def test_pop_many_never_loses_results_around_an_exception(
    dispatcher: papyros.TaskDispatcher,
) -> None:
    with dispatcher.make_queue() as queue:
        for i in range(10):
            queue.push(fail_if_odd(i))
        values, errors = [], 0
        while len(values) + errors < 10:
            try:
                values.extend(queue.pop_many(timeout=30))
            except ValueError:
                errors += 1
        assert sorted(values) == [0, 2, 4, 6, 8]
        assert errors == 5


# ------------------------------------------------------------ size bounds


def test_a_full_dispatcher_blocks_the_pusher(
    make_concurrent_dispatcher: DispatcherFactory,
) -> None:
    dispatcher = make_concurrent_dispatcher(size=2)
    with dispatcher.make_queue() as queue:
        # Long tasks occupy the workers (and whatever they prefetch); then the
        # dispatcher fills up, and a push times out instead of growing it.
        pushed = 0
        while pushed < 100:
            try:
                queue.push(sleep_then(2.0), timeout=0.2)
            except papyros.TimeoutError:
                break
            pushed += 1
        assert 2 <= pushed < 100, "pushes into a dispatcher of size 2 never blocked"
        # Two, unless a process worker slow to start took one since (a remote one has
        # joined before the test begins).
        assert 1 <= dispatcher.num_tasks() <= 2


def test_a_slow_consumer_does_not_stall_other_clients_of_a_bounded_dispatcher(
    make_concurrent_dispatcher: DispatcherFactory,
) -> None:
    dispatcher = make_concurrent_dispatcher(size=3)
    with dispatcher.make_queue(size=1) as slow, dispatcher.make_queue() as other:
        # The slow consumer pops nothing: its first task, finished, fills its queue, and
        # the three after it are held back, as many as the dispatcher's bound.
        for i in range(4):
            slow.push(square(i), timeout=30)
        # The other client's tasks still go in, and run.
        for i in range(5):
            other.push(square(i), timeout=30)
        assert sorted(other.pop(timeout=30) for _ in range(5)) == [0, 1, 4, 9, 16]
        assert sorted(slow.pop(timeout=30) for _ in range(4)) == [0, 1, 4, 9]


@pytest.mark.parametrize(("ordered", "chunksize"), COMBINATIONS)
def test_bounding_both_dispatcher_and_queue_never_deadlocks(
    make_dispatcher: DispatcherFactory, ordered: bool, chunksize: int
) -> None:
    dispatcher = make_dispatcher(size=1)
    results = dispatcher.execute(
        (square(i) for i in range(200)), ordered=ordered, chunksize=chunksize, qsize=1
    )
    assert sorted(results) == [i * i for i in range(200)]


def test_a_full_queue_holds_back_its_tasks_not_the_workers(
    make_concurrent_dispatcher: DispatcherFactory,
) -> None:
    dispatcher = make_concurrent_dispatcher()
    slow_consumer = dispatcher.make_queue(size=1)
    for i in range(5):
        slow_consumer.push(identity(i))
    # Another client's work goes through while the first queue is full.
    assert sorted(dispatcher.execute(square(i) for i in range(50))) == [i * i for i in range(50)]
    assert sorted(slow_consumer.pop(timeout=30) for _ in range(5)) == list(range(5))
    slow_consumer.close()


# ------------------------------------------------------------ closing cancels


def test_closing_an_execute_iterator_cancels_its_pending_tasks(
    make_dispatcher: DispatcherFactory, tmp_path: Path
) -> None:
    dispatcher = make_dispatcher()
    ran = tmp_path / "ran"
    results = dispatcher.execute(record(str(ran), i, 0.01) for i in range(2000))
    for _ in range(5):
        next(results)
    results.close()
    assert dispatcher.num_queues() == 0
    assert dispatcher.num_tasks() == 0
    dispatcher.close()  # Waits for the tasks in flight.
    assert 5 <= len(lines(ran)) < 500


def test_breaking_out_of_execute_frees_the_queue(dispatcher: papyros.TaskDispatcher) -> None:
    def consume() -> None:
        for result in dispatcher.execute(sleep_then(0.001, i) for i in range(1000)):
            if result is not None:
                break

    consume()
    gc.collect()
    assert dispatcher.num_queues() == 0
    assert dispatcher.num_tasks() == 0


def test_ctrl_c_inside_execute_cancels_it(dispatcher: papyros.TaskDispatcher) -> None:
    tasks = [interrupt(os.getpid()), *(sleep_then(0.01) for _ in range(500))]
    results = dispatcher.execute(tasks, ordered=True)
    with pytest.raises(KeyboardInterrupt):
        list(results)
    assert dispatcher.num_queues() == 0
    assert dispatcher.num_tasks() == 0


def test_closing_a_queue_cancels_its_pending_tasks(
    make_concurrent_dispatcher: DispatcherFactory, tmp_path: Path
) -> None:
    dispatcher = make_concurrent_dispatcher()
    ran = tmp_path / "ran"
    queue = dispatcher.make_queue()
    for i in range(1000):
        queue.push(record(str(ran), i, 0.01))
    queue.close()
    assert dispatcher.num_tasks() == 0
    dispatcher.close()
    assert len(lines(ran)) < 100


# ------------------------------------------------------------ lifecycle


def test_closed_queue_refuses_use(dispatcher: papyros.TaskDispatcher) -> None:
    queue = dispatcher.make_queue()
    queue.close()
    queue.close()  # Idempotent.
    for call in (lambda: queue.push(square(1)), queue.pop, queue.pop_many):
        with pytest.raises(papyros.ClosedTaskQueueError):
            call()
    assert dispatcher.num_queues() == 0


def test_closed_dispatcher_refuses_use(make_dispatcher: DispatcherFactory) -> None:
    dispatcher = make_dispatcher()
    queue = dispatcher.make_queue()
    with dispatcher:
        pass
    assert dispatcher.closed
    dispatcher.close()  # Idempotent.
    with pytest.raises(papyros.ClosedTaskDispatcherError):
        dispatcher.make_queue()
    with pytest.raises(papyros.ClosedTaskDispatcherError):
        dispatcher.execute([square(1)])
    with pytest.raises(papyros.ClosedTaskDispatcherError):
        queue.push(square(1))
    with pytest.raises(papyros.ClosedTaskDispatcherError):
        queue.pop(timeout=1)
    for count in (dispatcher.num_queues, dispatcher.num_tasks):
        with pytest.raises(papyros.ClosedTaskDispatcherError):
            count()


def test_close_wakes_a_blocked_consumer(make_concurrent_dispatcher: DispatcherFactory) -> None:
    dispatcher = make_concurrent_dispatcher()
    queue = dispatcher.make_queue()
    queue.push(sleep_then(0.3))
    errors: list[BaseException] = []
    started = threading.Event()

    def consumer() -> None:
        started.set()
        try:
            queue.pop()
            queue.pop()  # Nothing more was pushed: only close() can end this wait.
        except papyros.PapyrosError as exc:
            errors.append(exc)

    thread = threading.Thread(target=consumer)
    thread.start()
    started.wait()
    dispatcher.close()
    thread.join(10)
    assert not thread.is_alive()
    assert len(errors) == 1
    assert isinstance(errors[0], papyros.ClosedTaskDispatcherError)


def test_num_queues_counts_open_queues(dispatcher: papyros.TaskDispatcher) -> None:
    queues = [dispatcher.make_queue() for _ in range(3)]
    assert dispatcher.num_queues() == 3
    queues.pop().close()
    assert dispatcher.num_queues() == 2
    del queues[:]
    gc.collect()
    assert dispatcher.num_queues() == 0


def test_bad_sizes_are_rejected(make_dispatcher: DispatcherFactory) -> None:
    with pytest.raises((ValueError, papyros.ConfigurationError)):
        make_dispatcher(size=-1)
    dispatcher = make_dispatcher()
    with pytest.raises(ValueError, match="size"):
        dispatcher.make_queue(size=-1)
    with pytest.raises(ValueError, match="size"):
        dispatcher.execute([], qsize=-2)


# ------------------------------------------------- task classes with their own state


@pytest.mark.parametrize("chunksize", [1, 3])
def test_tasks_with_their_own_init_and_state_run_as_they_were_made(
    dispatcher: papyros.TaskDispatcher, chunksize: int
) -> None:
    tasks: list[papyros.Task] = [Scale(i, factor=10) for i in range(4)]
    tasks += [SlottedScale(i, factor=100) for i in range(4)]
    tasks += [Greeting("bob"), Greeting("ann"), Scale(7), SlottedScale(7)]
    results = list(dispatcher.execute(tasks, ordered=True, chunksize=chunksize))
    assert results == [0, 10, 20, 30, 0, 100, 200, 300, "hello bob", "hello ann", 14, 14]


@pytest.mark.parametrize("task_type", [Scale, SlottedScale])
@pytest.mark.parametrize("chunksize", [1, 3])
def test_task_attr_copies_a_task_with_its_own_state(
    dispatcher: papyros.TaskDispatcher, task_type: type[Scale], chunksize: int
) -> None:
    tasks = [task_type(1, factor=7), task_type(-2, factor=7), task_type(3, factor=7)]
    results = dispatcher.execute(tasks, ordered=True, chunksize=chunksize)
    assert next(results) == 7
    with pytest.raises(ValueError, match="negative: -2") as info:
        next(results)
    assert list(results) == [21]
    copy = info.value.task  # type: ignore[attr-defined]
    assert type(copy) is task_type
    assert (copy.args, copy.factor) == ((-2,), 7)
    with pytest.raises(papyros.UnprocessedTaskError):
        copy.result()  # A fresh copy: the failure is not stored in it.


def test_a_task_that_travels_as_a_value_keeps_its_state_and_outcome(
    dispatcher: papyros.TaskDispatcher,
) -> None:
    done = Scale(3, factor=5)
    done.execute()
    [back] = dispatcher.execute([identity(done)])
    assert (type(back), back.factor, back.result()) == (Scale, 5, 15)
    [back] = dispatcher.execute([identity(Greeting("eve"))])
    with pytest.raises(papyros.UnprocessedTaskError):
        back.result()
    back.execute()
    assert back.result() == "hello eve"


# ------------------------------------------------------------ SystemExit and kin


def _outcome(queue: papyros.TaskQueue) -> object:
    """The next result of ``queue``, or the exception it raised (any kind) in its place."""
    try:
        return queue.pop(timeout=30)
    except BaseException as exc:
        return exc


@pytest.mark.parametrize("error", [SystemExit, KeyboardInterrupt, GeneratorExit])
def test_a_task_raising_systemexit_or_kin_stops_nothing_else(
    make_dispatcher: DispatcherFactory, backend: str, error: type[BaseException]
) -> None:
    # One worker: the task's exception must not take it down with the tasks it holds.
    dispatcher = make_dispatcher(workers=1) if backend != "dummy" else make_dispatcher()
    queue = dispatcher.make_queue()
    for task in (square(2), raise_base_exception(error), square(3)):
        queue.push(task)
    if backend == "dummy" and error is KeyboardInterrupt:
        # Tasks run in the caller's thread, where a KeyboardInterrupt cannot be told from
        # Ctrl-C: it interrupts the caller at once, and the task did not finish.
        assert _outcome(queue) == 4
        with pytest.raises(KeyboardInterrupt):
            queue.pop(timeout=30)
        queue.close()
    else:
        outcomes = [_outcome(queue) for _ in range(3)]
        results = [outcome for outcome in outcomes if not isinstance(outcome, BaseException)]
        [failure] = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        assert sorted(results) == [4, 9]  # type: ignore[type-var]
        # Raised in the task's place, as ThreadPoolExecutor makes it the future's outcome.
        assert outcomes[1] is failure
        assert type(failure) is error
        assert str(failure) == "raised by the task"
        queue.close()
    assert list(dispatcher.map(square, range(5), ordered=True)) == [0, 1, 4, 9, 16]


def test_systemexit_from_a_task_with_a_time_limit_is_its_outcome(
    dispatcher: papyros.TaskDispatcher,
) -> None:
    results = dispatcher.execute(
        [raise_base_exception_in_time(SystemExit), square(3)], ordered=True
    )
    with pytest.raises(SystemExit, match="raised by the task"):
        next(results)
    assert list(results) == [9]


@pytest.mark.parametrize("how", ["execute", "map"])
@pytest.mark.parametrize("error", [SystemExit, GeneratorExit])
def test_systemexit_or_kin_in_a_chunk_is_the_outcome_of_its_task_only(
    dispatcher: papyros.TaskDispatcher, error: type[BaseException], how: str
) -> None:
    if how == "execute":
        tasks = [square(2), raise_base_exception(error), square(3)]
        results = dispatcher.execute(tasks, ordered=True, chunksize=3)
    else:
        results = dispatcher.map(raise_or_square, [2, error, 3], ordered=True, chunksize=3)
    assert next(results) == 4
    with pytest.raises(error):
        next(results)
    assert list(results) == [9]


# ------------------------------------------------------------ taken units are cancelled too


def test_closing_a_queue_cancels_the_units_workers_took_in_advance(
    dispatcher: papyros.TaskDispatcher, tmp_path: Path
) -> None:
    # Workers may take several units at a time; those not started yet are cancelled too.
    ran = tmp_path / "ran"
    queue = dispatcher.make_queue()
    for i in range(40):
        queue.push(record(str(ran), i, 0.2))
    queue.pop(timeout=30)
    queue.close()
    dispatcher.close()
    # Those running at the close, and any a worker started just before it saw it.
    assert len(lines(ran)) <= 4 * WORKERS


def test_breaking_out_of_execute_cancels_the_units_workers_took_in_advance(
    dispatcher: papyros.TaskDispatcher, tmp_path: Path
) -> None:
    ran = tmp_path / "ran"

    def consume() -> None:
        for _ in dispatcher.execute(record(str(ran), i, 0.2) for i in range(40)):
            break  # The iterator is garbage now: collecting it closes it.

    consume()
    dispatcher.close()
    assert len(lines(ran)) <= 4 * WORKERS
