"""Unit tests of the scheduling core, on its own: no workers, no threads unless stated."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from papyros.errors import (
    ClosedTaskDispatcherError,
    ClosedTaskQueueError,
    TimeoutError,
    WorkerLostError,
)
from papyros.scheduler import Scheduler

NOW = 0.0  # A deadline in the past: never wait.


def test_a_unit_goes_from_submit_to_assign_to_fetch() -> None:
    core = Scheduler()
    queue = core.open_queue()
    [unit_id] = core.submit(queue, [("payload", 1)])
    assert core.num_tasks() == 1
    [assignment] = core.assign("w1")
    assert (assignment.unit_id, assignment.attempt, assignment.payload) == (unit_id, 1, "payload")
    assert core.num_tasks() == 0
    assert core.fetch(queue, NOW) == []
    assert core.complete("w1", unit_id, 1, "outcome")
    [finished] = core.fetch(queue, NOW)
    assert (finished.unit_id, finished.outcome, finished.error) == (unit_id, "outcome", None)


def test_assign_waits_until_the_deadline() -> None:
    core = Scheduler()
    start = time.monotonic()
    assert core.assign("w", deadline=time.monotonic() + 0.05) == []
    assert time.monotonic() - start >= 0.05


def test_each_queue_is_fifo_and_queues_are_served_round_robin() -> None:
    core = Scheduler()
    first, second = core.open_queue(), core.open_queue()
    core.submit(first, [("a1", 1), ("a2", 1), ("a3", 1)])
    core.submit(second, [("b1", 1), ("b2", 1)])
    order = [core.assign("w", 1, NOW)[0].payload for _ in range(5)]
    assert order == ["a1", "b1", "a2", "b2", "a3"]


def test_dispatcher_bound_accepts_a_prefix_and_times_out_when_full() -> None:
    core = Scheduler(size=3)
    queue = core.open_queue()
    accepted = core.submit(queue, [("u", 2), ("v", 1), ("w", 1)])
    assert len(accepted) == 2
    with pytest.raises(TimeoutError):
        core.submit(queue, [("w", 1)], NOW)
    core.assign("worker", 1, NOW)
    assert len(core.submit(queue, [("w", 1)], NOW)) == 1


def test_a_unit_larger_than_the_bound_is_accepted_alone() -> None:
    core = Scheduler(size=2)
    queue = core.open_queue()
    assert len(core.submit(queue, [("big", 10)], NOW)) == 1
    with pytest.raises(TimeoutError):
        core.submit(queue, [("small", 1)], NOW)


def test_a_full_queue_holds_back_its_units_but_not_others() -> None:
    core = Scheduler()
    full, other = core.open_queue(size=1), core.open_queue()
    core.submit(full, [("f1", 1), ("f2", 1)])
    [a] = core.assign("w", 1, NOW)
    assert a.payload == "f1"
    core.complete("w", a.unit_id, a.attempt, None)
    assert core.assign("w", 1, NOW) == []  # f2 waits: f1's result is not fetched.
    core.submit(other, [("o1", 1)])
    assert core.assign("w", 1, NOW)[0].payload == "o1"
    core.fetch(full, NOW)
    assert core.assign("w", 1, NOW)[0].payload == "f2"


def test_a_lost_worker_s_units_are_retried_then_fail() -> None:
    core = Scheduler(max_attempts=2)
    queue = core.open_queue()
    [unit_id] = core.submit(queue, [("poison", 3)])
    [first] = core.assign("w1")
    assert core.worker_lost("w1", exitcode=-9) == [unit_id]
    [second] = core.assign("w2")
    assert second.attempt == 2
    assert core.worker_lost("w2", exitcode=-9) == []
    [finished] = core.fetch(queue, NOW)
    assert isinstance(finished.error, WorkerLostError)
    assert finished.error.attempts == 2
    assert finished.error.exitcode == -9
    assert "signal 9" in str(finished.error)
    assert finished.ntasks == 3
    # A late result of the first attempt is dropped.
    assert not core.complete("w1", first.unit_id, first.attempt, "late")
    assert core.fetch(queue, NOW) == []


def test_a_lost_worker_that_held_several_units_blames_none_and_each_then_runs_alone() -> None:
    core = Scheduler(max_attempts=1)
    queue = core.open_queue()
    core.submit(queue, [("poison", 1), ("innocent", 1), ("bystander", 1)])
    assert [a.payload for a in core.assign("w1", 3)] == ["poison", "innocent", "bystander"]
    # Any of the three may have been running (a worker may have finished units without
    # having sent their outcomes yet): none is blamed, even with no retry allowed.
    assert len(core.worker_lost("w1", exitcode=-9)) == 3
    # From now on each runs alone: a worker holding one gets nothing more.
    assert [a.payload for a in core.assign("w2", 3)] == ["poison"]
    assert core.assign("w2", 3, NOW) == []
    [innocent] = core.assign("w3", 3)
    assert innocent.payload == "innocent"
    # A death while a unit runs alone is that unit's.
    assert core.worker_lost("w2", exitcode=-9) == []
    [lost] = core.fetch(queue, NOW)
    assert isinstance(lost.error, WorkerLostError)
    assert lost.error.attempts == 1
    assert core.complete("w3", innocent.unit_id, innocent.attempt, "fine")
    assert [a.payload for a in core.assign("w3", 3)] == ["bystander"]
    assert [entry.outcome for entry in core.fetch(queue, NOW)] == ["fine"]


def test_a_suspect_goes_only_to_a_worker_that_holds_nothing() -> None:
    core = Scheduler()
    queue = core.open_queue()
    core.submit(queue, [("ordinary", 1)])
    [ordinary] = core.assign("busy", 1)
    core.submit(queue, [("a", 1), ("b", 1)])
    core.assign("w1", 2)
    core.worker_lost("w1", exitcode=-9)  # a and b are suspects now.
    assert core.assign("busy", 2, NOW) == []
    assert core.complete("busy", ordinary.unit_id, ordinary.attempt, "done")
    assert [a.payload for a in core.assign("busy", 2)] == ["a"]


def test_a_lost_worker_that_held_one_unit_blames_it_unless_told_not_to() -> None:
    core = Scheduler(max_attempts=2)
    queue = core.open_queue()
    core.submit(queue, [("p", 1)])
    core.assign("w1", 1)
    core.worker_lost("w1", blame_running=False)  # E.g. killed over its time limit.
    core.assign("w2", 1)
    assert core.worker_lost("w2", exitcode=-9) != []  # Blamed once: one attempt left.
    core.assign("w3", 1)
    assert core.worker_lost("w3", exitcode=-9) == []
    [finished] = core.fetch(queue, NOW)
    assert isinstance(finished.error, WorkerLostError)
    assert finished.error.attempts == 2


def test_a_stale_attempt_is_dropped_and_the_current_one_delivered() -> None:
    core = Scheduler()
    queue = core.open_queue()
    core.submit(queue, [("p", 1)])
    [first] = core.assign("slow")
    core.worker_lost("slow", reason="lease expired")
    [second] = core.assign("fast")
    assert not core.complete("slow", first.unit_id, first.attempt, "stale")
    assert core.complete("fast", second.unit_id, second.attempt, "fresh")
    assert [entry.outcome for entry in core.fetch(queue, NOW)] == ["fresh"]


def test_retried_units_go_before_the_rest_of_their_queue() -> None:
    core = Scheduler()
    queue = core.open_queue()
    core.submit(queue, [("a", 1), ("b", 1)])
    core.assign("w1", 1, NOW)
    core.worker_lost("w1")
    assert core.assign("w2", 1, NOW)[0].payload == "a"


def test_closing_a_queue_cancels_its_pending_units_and_drops_late_results() -> None:
    core = Scheduler()
    queue = core.open_queue()
    core.submit(queue, [("a", 1), ("b", 1), ("c", 1)])
    [a] = core.assign("w", 1, NOW)
    core.close_queue(queue)
    assert core.num_tasks() == 0
    assert core.num_queues() == 0
    assert core.assign("w", 1, NOW) == []
    assert not core.complete("w", a.unit_id, a.attempt, "late")
    with pytest.raises(ClosedTaskQueueError):
        core.fetch(queue, NOW)
    with pytest.raises(ClosedTaskQueueError):
        core.submit(queue, [("d", 1)])


def test_close_queue_soon_takes_effect_at_once_or_at_the_next_call() -> None:
    core = Scheduler()
    queue = core.open_queue()
    core.submit(queue, [("a", 1)])
    [assignment] = core.assign("w", max_units=1, deadline=NOW)
    core.complete("w", assignment.unit_id, assignment.attempt, b"a big result")
    core.close_queue_soon(queue)
    # The lock was free: the queue and its finished result are gone before any other call.
    assert core._queues == {}
    # A finalizer may run while its own thread holds the lock: then it waits for a call.
    other = core.open_queue()
    core.submit(other, [("b", 1)])
    with core._lock:
        core.close_queue_soon(other)
        assert other in core._queues
    assert core.num_tasks() == 0
    assert core.num_queues() == 0


def test_assign_keeps_each_worker_to_its_fair_share_however_often_it_asks() -> None:
    core = Scheduler()
    queue = core.open_queue()
    core.submit(queue, [(i, 1) for i in range(100)])
    batch = core.assign("w", max_units=64, deadline=NOW, share=2)
    assert len(batch) == 50
    # "w" holds half of the work: the rest is for the other worker.
    assert core.assign("w", max_units=8, deadline=NOW, share=2) == []
    assert len(core.assign("v", max_units=64, deadline=NOW, share=2)) == 50
    # Once it has finished some, its share of what is pending or in flight is open to it.
    for assignment in batch[:10]:
        assert core.complete("w", assignment.unit_id, assignment.attempt, b"")
    core.submit(queue, [(i, 1) for i in range(20)])
    assert len(core.assign("w", max_units=64, deadline=NOW, share=2)) == 15
    assert len(core.assign("v", max_units=64, deadline=NOW, share=2)) == 5
    core.close()


def test_a_worker_that_holds_nothing_gets_a_unit_bigger_than_its_share() -> None:
    core = Scheduler()
    queue = core.open_queue()
    core.submit(queue, [(0, 100), (1, 100)])
    assert len(core.assign("w", max_units=64, deadline=NOW, share=4)) == 1  # Its share is 50.
    assert core.assign("w", max_units=64, deadline=NOW, share=4) == []
    assert len(core.assign("v", max_units=64, deadline=NOW, share=4)) == 1
    core.close()


def test_assign_and_fetch_bound_the_bytes_they_take_but_take_one_unit_at_least() -> None:
    core = Scheduler()
    queue = core.open_queue()
    core.submit(queue, [(bytes(40), 1), (bytes(40), 1), (bytes(40), 1), (bytes(200), 1)])
    assert [len(a.payload) for a in core.assign("w", max_units=8, deadline=NOW, max_bytes=100)] == [
        40,
        40,
    ]
    assert len(core.assign("w", max_units=8, deadline=NOW, max_bytes=100)) == 1
    [big] = core.assign("w", max_units=8, deadline=NOW, max_bytes=100)
    assert len(big.payload) == 200
    for assignment in core.held_by("w"):
        core.complete("w", assignment, 1, bytes(60))
    assert len(core.fetch(queue, NOW, max_bytes=100)) == 1
    assert len(core.fetch(queue, NOW, max_bytes=150)) == 2
    assert len(core.fetch(queue, NOW, max_bytes=100)) == 1
    assert core.fetch(queue, NOW, max_bytes=100) == []
    core.close()


def test_units_given_back_go_to_other_workers_in_order_and_late_results_are_dropped() -> None:
    core = Scheduler()
    queue = core.open_queue()
    ids = core.submit(queue, [(i, 1) for i in range(5)])
    first = core.assign("a", max_units=5, deadline=NOW)
    assert [a.unit_id for a in first] == ids
    assert core.give_back("a", [ids[4], ids[2], ids[3], 999]) == ids[2:]
    assert core.held_by("a") == ids[:2]
    assert core.num_tasks() == 3
    taken = core.assign("b", max_units=5, deadline=NOW)
    assert [a.unit_id for a in taken] == ids[2:]
    assert not core.complete("a", ids[2], 1, "late")  # "a" gave it back: not its result.
    for assignment in [*first[:2], *taken]:
        worker = "a" if assignment in first else "b"
        assert core.complete(worker, assignment.unit_id, assignment.attempt, assignment.payload)
    assert sorted(entry.outcome for entry in core.fetch(queue, NOW)) == list(range(5))
    assert core.give_back("a", ids) == []
    core.close()


def test_close_wakes_every_waiter() -> None:
    core = Scheduler(size=1)
    queue = core.open_queue()
    core.submit(queue, [("fill", 1)])
    errors: list[BaseException] = []
    ready = threading.Barrier(4)

    def wait_for(call: object) -> None:
        ready.wait()
        try:
            call()  # type: ignore[operator]
        except ClosedTaskDispatcherError as exc:
            errors.append(exc)

    other = core.open_queue()
    calls = [
        lambda: core.fetch(queue),
        lambda: core.submit(other, [("x", 1)]),
        lambda: [core.assign(f"w{i}") for i in range(3)],
    ]
    threads = [threading.Thread(target=wait_for, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    ready.wait()
    core.close()
    for thread in threads:
        thread.join(5)
    assert not any(thread.is_alive() for thread in threads)
    assert len(errors) == 3
    core.close()  # Idempotent.


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="size"):
        Scheduler(size=-1)
    with pytest.raises(ValueError, match="max_attempts"):
        Scheduler(max_attempts=0)
    with pytest.raises(ValueError, match="size"):
        Scheduler().open_queue(size=-1)


class ExactlyOnce(RuleBasedStateMachine):
    """Any interleaving of submits, assigns, completions, losses, fetches and closes.

    Invariant: every unit submitted to a queue that stays open is fetched from
    that queue exactly once, and never from another.
    """

    def __init__(self) -> None:
        super().__init__()
        self.core = Scheduler(size=0, max_attempts=2)
        self.open: dict[int, int] = {}  # queue id -> its size bound
        self.owner: dict[int, int] = {}  # unit id -> queue id
        self.fetched: dict[int, int] = {}  # unit id -> times fetched
        self.closed: set[int] = set()
        self.held: dict[str, list[tuple[int, int]]] = {}  # worker -> (unit, attempt)

    @rule(size=st.integers(0, 3))
    def open_queue(self, size: int) -> None:
        self.open[self.core.open_queue(size)] = size

    @precondition(lambda self: self.open)
    @rule(data=st.data(), count=st.integers(1, 4), ntasks=st.integers(1, 3))
    def submit(self, data: st.DataObject, count: int, ntasks: int) -> None:
        queue = data.draw(st.sampled_from(sorted(self.open)))
        for unit_id in self.core.submit(queue, [(queue, ntasks)] * count, NOW):
            self.owner[unit_id] = queue

    @rule(
        worker=st.sampled_from(["a", "b", "c"]),
        max_units=st.integers(1, 3),
        share=st.integers(1, 3),
    )
    def assign(self, worker: str, max_units: int, share: int) -> None:
        holds_nothing = not self.core.held_by(worker)
        assignable = self.core.num_tasks() > 0
        assignments = self.core.assign(worker, max_units, NOW, share=share)
        if holds_nothing and assignable:
            # Units pending may all be held back by full queues, but then none is assignable.
            assert assignments or not self.core._ring
        for assignment in assignments:
            assert assignment.payload == self.owner[assignment.unit_id]
            self.held.setdefault(worker, []).append((assignment.unit_id, assignment.attempt))

    @precondition(lambda self: any(self.held.values()))
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        worker = data.draw(st.sampled_from(sorted(w for w, units in self.held.items() if units)))
        unit_id, attempt = self.held[worker].pop(0)
        self.core.complete(worker, unit_id, attempt, ("done", unit_id))

    @rule(worker=st.sampled_from(["a", "b", "c"]))
    def lose_worker(self, worker: str) -> None:
        self.core.worker_lost(worker, exitcode=-9)
        # A lost worker's late results still arrive, and must be dropped.
        for unit_id, attempt in self.held.pop(worker, []):
            self.core.complete(worker, unit_id, attempt, ("late", unit_id))

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def fetch(self, data: st.DataObject) -> None:
        queue = data.draw(st.sampled_from(sorted(self.open)))
        for entry in self.core.fetch(queue, NOW):
            assert self.owner[entry.unit_id] == queue
            assert entry.error is not None or entry.outcome == ("done", entry.unit_id)
            self.fetched[entry.unit_id] = self.fetched.get(entry.unit_id, 0) + 1

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def close_queue(self, data: st.DataObject) -> None:
        queue = data.draw(st.sampled_from(sorted(self.open)))
        self.core.close_queue(queue)
        del self.open[queue]
        self.closed.add(queue)

    @invariant()
    def nothing_fetched_twice(self) -> None:
        assert all(count == 1 for count in self.fetched.values())

    @invariant()
    def tasks_in_flight_are_counted_right(self) -> None:
        core = self.core
        inflight = list(core._inflight.values())
        assert core._inflight_tasks == sum(unit.ntasks for unit in inflight)
        for worker, held in core._held.items():
            held_tasks = sum(core._inflight[unit_id].ntasks for unit_id in held)
            assert core._held_tasks.get(worker, 0) == held_tasks

    def teardown(self) -> None:
        # Drain: run everything still pending or held, then every open queue
        # must have yielded each of its units exactly once.
        for worker, units in self.held.items():
            for unit_id, attempt in units:
                self.core.complete(worker, unit_id, attempt, ("done", unit_id))
        while True:
            for queue in self.open:  # Fetching makes room in bounded queues.
                self.fetch_all(queue)
            assignments = self.core.assign("drain", 100, NOW)
            if not assignments:
                break
            for a in assignments:
                self.core.complete("drain", a.unit_id, a.attempt, ("done", a.unit_id))
        for unit_id, queue in self.owner.items():
            if queue in self.open:
                assert self.fetched.get(unit_id) == 1, (unit_id, queue)
        assert self.core.num_tasks() == 0
        self.core.close()

    def fetch_all(self, queue: int) -> None:
        for entry in self.core.fetch(queue, NOW):
            assert self.owner[entry.unit_id] == queue
            self.fetched[entry.unit_id] = self.fetched.get(entry.unit_id, 0) + 1


ExactlyOnce.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_exactly_once = ExactlyOnce.TestCase
