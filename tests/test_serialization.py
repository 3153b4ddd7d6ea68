"""The pickling helpers of papyros.serialization: pickles in pieces, and reading them unjoined."""

from __future__ import annotations

import pickle
import threading
from typing import Any

import pytest

from papyros import RemoteTaskError
from papyros.serialization import PickleCodec, _dumps_in_pieces, _PiecesReader
from papyros.serialization import _loads as loads_pieces
from tests.tasks import identity


def _loads(data: bytes | tuple[bytes, ...]) -> Any:
    return pickle.loads(b"".join(data) if isinstance(data, tuple) else data)


def test_small_values_pickle_alike_on_every_call() -> None:
    shared = [1, 2, 3]
    for _ in range(3):
        # The same object twice in one value, and again in the next call: a memo kept
        # from one call to the next would make the second pickle refer to the first.
        data = _dumps_in_pieces((shared, shared))
        assert isinstance(data, bytes)
        assert data == pickle.dumps((shared, shared), 5)
        first, second = pickle.loads(data)
        assert first == shared
        assert first is second


class _Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("not today")


def test_a_failed_pickle_leaves_the_next_one_right() -> None:
    # The large bytes is written out before the failure: none of it may reach the next pickle.
    with pytest.raises((TypeError, pickle.PicklingError), match="not today"):
        _dumps_in_pieces([b"x" * 100_000, _Unpicklable()])
    assert _dumps_in_pieces(["after", 2]) == pickle.dumps(["after", 2], 5)


class _Nested:
    """Pickles another value with the same helper while being pickled."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def __reduce__(self) -> Any:
        return (_Nested._rebuild, (_dumps_in_pieces(self.inner),))

    @staticmethod
    def _rebuild(data: bytes) -> _Nested:
        return _Nested(pickle.loads(data))


def test_a_pickle_made_while_another_is_being_made() -> None:
    data = _dumps_in_pieces(["outer", _Nested({"inner": [1, 2]}), "end"])
    outer, nested, end = _loads(data)
    assert (outer, nested.inner, end) == ("outer", {"inner": [1, 2]}, "end")
    assert _loads(_dumps_in_pieces("again")) == "again"


def test_a_large_bytes_is_kept_and_a_large_bytearray_copied() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    data = _dumps_in_pieces(("head", payload, "tail"))
    assert isinstance(data, tuple)
    assert any(piece is payload for piece in data)
    assert _loads(data) == ("head", payload, "tail")

    buffer = bytearray(payload)
    data = _dumps_in_pieces(("head", buffer, "tail"))
    assert isinstance(data, tuple)
    assert all(type(piece) is bytes for piece in data)
    buffer[:4] = b"XXXX"  # Changed after pickling: the pickle must not change.
    assert _loads(data) == ("head", bytearray(payload), "tail")


def test_threads_each_pickle_their_own_values() -> None:
    errors: list[str] = []

    def pickle_many(seed: int) -> None:
        for index in range(2000):
            value = (seed, index, [seed] * (index % 7))
            if _loads(_dumps_in_pieces(value)) != value:
                errors.append(f"thread {seed}, value {index}")
                return

    threads = [threading.Thread(target=pickle_many, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


@pytest.mark.parametrize(
    "value",
    [
        ("head", bytes(range(256)) * 4096, "tail"),
        [b"a" * 70_000, b"b" * 200_000, "between", b"c" * 65_536],
        {"buffer": bytearray(b"z" * 300_000), "text": "t" * 100_000},
        list(range(100_000)),  # Many frames, no large object.
    ],
    ids=["bytes", "several", "bytearray-and-str", "frames"],
)
def test_pieces_unpickle_without_being_joined(value: Any) -> None:
    data = _dumps_in_pieces(value)
    assert isinstance(data, tuple)
    assert loads_pieces(data) == value
    assert loads_pieces(b"".join(data)) == value


def test_the_pieces_reader_reads_across_pieces() -> None:
    reader = _PiecesReader((b"ab", b"cde", b"", b"f"))
    buffer = bytearray(4)
    assert reader.readinto(buffer) == 4
    assert buffer == b"abcd"
    assert reader.read(1) == b"e"
    assert reader.read(5) == b"f"
    assert reader.read(1) == b""
    assert reader.readinto(bytearray(3)) == 0

    whole = b"one piece"
    reader = _PiecesReader((whole, b"rest"))
    assert reader.read(len(whole)) is whole  # A whole piece is not copied.
    assert reader.read() == b"rest"

    reader = _PiecesReader((b"ab\ncd", b"e\nf"))
    assert [reader.readline() for _ in range(4)] == [b"ab\n", b"cde\n", b"f", b""]


def test_a_codec_decodes_units_and_outcomes_that_travelled_in_pieces() -> None:
    payload = bytes(range(256)) * 4096
    sender, receiver = PickleCodec(pieces=True), PickleCodec()

    unit = sender.encode_unit([identity(payload), identity(b"small")])
    assert isinstance(unit, tuple)
    tasks = receiver.decode_unit(unit)
    assert [task.args for task in tasks] == [(payload,), (b"small",)]

    error = ValueError("boom")
    outcome = sender.encode_results([payload, None], {1: error})
    assert isinstance(outcome, tuple)
    values, errors = receiver.decode_results(outcome)
    assert values == [payload, None]
    assert type(errors[1]) is ValueError
    assert str(errors[1]) == "boom"
    outcome = sender.encode_results([payload], {})
    assert receiver.decode_results(outcome) == ([payload], {})


def test_outcomes_in_pieces_that_cannot_be_unpickled_fail_each_task() -> None:
    outcome = PickleCodec(pieces=True).encode_results([b"x" * 100_000, 1, 2], {})
    assert isinstance(outcome, tuple)
    broken = (outcome[0], outcome[1][:-1])  # The header, and a truncated pickle.
    values, errors = PickleCodec().decode_results(broken)
    assert values == [None] * 3
    assert sorted(errors) == [0, 1, 2]
    assert all(isinstance(error, RemoteTaskError) for error in errors.values())
