"""The pickle codec: how units of tasks and their outcomes cross a process boundary.

A unit is pickled once in the client and unpickled once in the worker; its
outcomes are pickled once in the worker and unpickled once in the client.
Everything in between (the scheduling core, the pipes) moves opaque bytes.

Encoding rules, fastest first:

- A unit whose tasks are all of one class travels as the class once plus the
  list of argument tuples, not as one pickled object per task: a chunk of
  1,000 small tasks costs little more than a list of 1,000 tuples. This is
  for classes whose tasks are all in their arguments (see
  ``Task._from_args``), such as those made by :meth:`Task.subclass`; a task of
  a class with its own ``__init__`` or instance state travels whole, with
  standard pickle semantics (its state restored, its ``__init__`` not called),
  as it would be on the thread backend.
- Plain :mod:`pickle` (highest protocol) is used where it works.
  :mod:`cloudpickle`, which pickles *by value*, takes over where it does not:
  lambdas and closures as arguments, task classes defined inside functions,
  and anything defined in ``__main__`` (which a worker process cannot import
  by name). A class pickled by value is pickled once per client and rebuilt
  once per worker, not once per unit.
- A task or argument that cannot be pickled at all is a
  :class:`~papyros.SerializationError` in the client, at ``push``, naming the
  offending object. A unit that a worker cannot unpickle (say, its task class
  lives in a module the worker cannot import) ends with a
  :class:`~papyros.SerializationError` per task, naming the cause
  (:meth:`PickleCodec.unreadable_unit`); the worker goes on with other units.
- In the worker, a result that cannot be pickled, or an exception that cannot
  be pickled or rebuilt, becomes a :class:`~papyros.RemoteTaskError` carrying
  the type name, message and traceback text; the worker itself lives on.
  Every exception that travels back carries its remote traceback as text,
  chained as ``__cause__`` for display (as :mod:`concurrent.futures` does).
"""

from __future__ import annotations

import collections
import gc
import pickle
import reprlib
import threading
import traceback
import types
import weakref
from typing import Any, TypeAlias

from papyros.errors import RemoteTaskError, SerializationError
from papyros.task import ExceptionTypes, Outcome, Results, Task, TaskBatch, Unit
from papyros.worker import Codec

__all__ = ["Payload", "PickleCodec", "describe_task"]

#: What the codec makes of a unit or of its outcomes: one buffer, or a tuple of pieces
#: (see :func:`_dumps_in_pieces`) that travel back to back.
Payload: TypeAlias = "bytes | tuple[bytes, ...]"

_PROTOCOL = pickle.HIGHEST_PROTOCOL

# Where plain pickle would refer to ``__main__``, which workers cannot import by name.
_MAIN_MARKER = b"__main__"
# Pickles larger than this are not searched for the marker (a search costs as much as
# a copy) but pickled again into nothing, with a hook that sees every class and function.
_SEARCH_BYTES = 1 << 16

# Outcome payloads start with the unit's task count, so that a unit whose
# outcomes cannot be unpickled in the client still yields one error per task,
# then one byte saying whether any task failed. What follows is the pickle of
# the list of results when none failed, else of the list of results (None
# where a task failed) and a dict of the failures by position.
_COUNT_BYTES = 4
_HEADER_BYTES = _COUNT_BYTES + 1

# A worker remembers the task classes it rebuilt from by-value pickles, so that the
# units of one class rebuild it once, but a program that maps many lambdas or
# closures makes a class for each, with what they capture: the least recently used
# are forgotten past this many, or past this many bytes of pickles.
_KNOWN_CLASSES = 1024
_KNOWN_CLASS_BYTES = 64 * 2**20


_short = reprlib.Repr()
_short.maxstring = 80
_short.maxother = 80


def describe_task(task: Task) -> str:
    """``task`` in a few words, for an error message: never long, and never failing."""
    cls = type(task)
    name = f"{cls.__module__}.{cls.__qualname__}"
    try:
        parts = [_short.repr(arg) for arg in task.args]
        parts.extend(f"{key}={_short.repr(value)}" for key, value in task.kwargs.items())
    except Exception:  # A task class with state of its own, and no args, say.
        return name
    return f"{name}({', '.join(parts)})"


class _MainFound(Exception):
    """Raised by _MainScanner when a value refers to something defined in ``__main__``."""


class _Discard:
    """A file that forgets what is written to it (bytes, or a large buffer as it is)."""

    def write(self, data: Any) -> None:
        pass  # The pickler ignores what write returns.


class _MainScanner(pickle.Pickler):
    """Pickles into nothing, to learn whether a value refers to ``__main__`` by name."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (type, types.FunctionType)) and obj.__module__ == "__main__":
            raise _MainFound
        return NotImplemented


def _by_value_needed(value: object, data: bytes) -> bool:
    """Whether ``data``, the plain pickle of ``value``, names something in ``__main__``."""
    if len(data) <= _SEARCH_BYTES:
        return _MAIN_MARKER in data
    return _names_main(value)


def _names_main(value: object) -> bool:
    """Whether the plain pickle of ``value`` names something in ``__main__``."""
    try:
        _MainScanner(_Discard(), _PROTOCOL).dump(value)
    except _MainFound:
        return True
    return False


def _cloudpickle() -> Any:
    import cloudpickle  # Imported on first need: most runs never need it.

    return cloudpickle


class _RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, as text, for display."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


class _Failure:
    """An exception on its way back from a worker, with what to say if it cannot be rebuilt."""

    __slots__ = ("message", "pickled", "traceback", "type_name")

    def __init__(self, pickled: bytes | None, type_name: str, message: str, traceback: str) -> None:
        self.pickled = pickled
        self.type_name = type_name
        self.message = message
        self.traceback = traceback

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Failure, (self.pickled, self.type_name, self.message, self.traceback))

    @classmethod
    def of(cls, exc: BaseException) -> _Failure:
        """Wrap an exception a task raised (in the worker)."""
        type_name = _type_name(type(exc))
        tb = exc.__traceback__
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next  # Skip Task._run: the traceback starts in the task's own code.
        text = "".join(traceback.format_exception(type(exc), exc, tb)) if tb is not None else ""
        try:
            pickled = _dumps(exc)
            pickle.loads(pickled)  # Can it be rebuilt? Exceptions are rare: check it here.
        except Exception as error:
            pickled = None
            text += f"\n(the exception could not travel back to the client: {error})"
        return cls(pickled, type_name, _safe_str(exc), text)

    def rebuild(self) -> BaseException:
        """The original exception if it can be rebuilt here, else a RemoteTaskError."""
        exc: BaseException | None = None
        if self.pickled is not None:
            try:
                exc = pickle.loads(self.pickled)
            except Exception:
                exc = None
            if not isinstance(exc, BaseException):
                exc = None
        if exc is None:
            exc = RemoteTaskError(self.type_name, self.message, self.traceback)
        if self.traceback and exc.__cause__ is None:
            exc.__cause__ = _RemoteTraceback(f'\n"""\n{self.traceback}"""')
        return exc


def _type_name(cls: type) -> str:
    module = getattr(cls, "__module__", "")
    qualname = getattr(cls, "__qualname__", cls.__name__)
    return qualname if module in ("builtins", "", None) else f"{module}.{qualname}"


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def _dumps(value: object) -> bytes:
    """Plain pickle where it works, cloudpickle (by value) where it does not."""
    try:
        data = pickle.dumps(value, _PROTOCOL)
    except Exception:
        data = b""
    if not data or _by_value_needed(value, data):
        data = _cloudpickle().dumps(value, _PROTOCOL)
    return data


class _Pieces:
    """A pickler's file that keeps what is written to it, in pieces.

    A pickler writes a large ``bytes`` object of the value it pickles as it is,
    in a write of its own: it is kept by reference (it cannot change), never
    copied. ``write`` is the list's own ``append`` (the pickler ignores what
    it returns), so a write costs no Python call.
    """

    __slots__ = ("pieces", "write")

    def __init__(self) -> None:
        self.pieces: list[Any] = []
        self.write = self.pieces.append


# Each thread's pickler for _dumps_in_pieces, and its file: making a Pickler costs
# more than pickling a small unit with it.
_picklers = threading.local()


def _dumps_in_pieces(value: object) -> Payload:
    """Like :func:`_dumps`, but a large pickle comes as a tuple of pieces holding the large
    ``bytes`` objects of ``value`` themselves: a 1 MB argument or result is not copied."""
    # Taken out while in use, so that a pickle made while this one is (by some
    # __reduce__) gets a pickler of its own.
    pair: tuple[pickle.Pickler, _Pieces] | None = getattr(_picklers, "pair", None)
    _picklers.pair = None
    if pair is None:
        out = _Pieces()
        pair = (pickle.Pickler(out, _PROTOCOL), out)
    pickler, out = pair
    try:
        pickler.dump(value)
    except Exception:
        # The pickler is left as the failure left it: it is dropped, with what it wrote.
        return _cloudpickle().dumps(value, _PROTOCOL)  # type: ignore[no-any-return]
    finally:
        pickler.clear_memo()  # It holds every object pickled.
    pieces = out.pieces[:]
    out.pieces.clear()
    _picklers.pair = pair
    if len(pieces) == 1 and len(pieces[0]) <= _SEARCH_BYTES:
        data: bytes = pieces[0]
        if _MAIN_MARKER in data:
            return _cloudpickle().dumps(value, _PROTOCOL)  # type: ignore[no-any-return]
        return data
    if _names_main(value):
        return _cloudpickle().dumps(value, _PROTOCOL)  # type: ignore[no-any-return]
    # A large bytearray or buffer is written as it is: it could change, so it is copied.
    return tuple(piece if type(piece) is bytes else bytes(piece) for piece in pieces)


class _PiecesReader:
    """A file to unpickle a pickle in pieces from (see :func:`_dumps_in_pieces`), unjoined.

    The unpickler reads a large ``bytes`` object of the pickle with ``readinto``,
    straight into the object it makes: the pieces are never joined into one
    buffer first, which would copy them all once more.
    """

    __slots__ = ("_index", "_offset", "_pieces")

    def __init__(self, pieces: tuple[bytes, ...]) -> None:
        self._pieces = pieces
        self._index = 0  # The piece being read,
        self._offset = 0  # and where in it.

    def readinto(self, buffer: Any) -> int:
        pieces = self._pieces
        with memoryview(buffer) as view:
            filled = 0
            while filled < len(view) and self._index < len(pieces):
                piece = pieces[self._index]
                count = min(len(piece) - self._offset, len(view) - filled)
                with memoryview(piece) as source:
                    view[filled : filled + count] = source[self._offset : self._offset + count]
                filled += count
                self._offset += count
                if self._offset == len(piece):
                    self._index += 1
                    self._offset = 0
        return filled

    def read(self, size: int = -1) -> bytes:
        if self._index < len(self._pieces):
            piece = self._pieces[self._index]
            start = self._offset
            if 0 <= size <= len(piece) - start:  # The common case: within one piece.
                self._offset += size
                if self._offset == len(piece):
                    self._index += 1
                    self._offset = 0
                return piece if start == 0 and size == len(piece) else piece[start : start + size]
        if size < 0:
            size = sum(map(len, self._pieces[self._index :])) - self._offset
        buffer = bytearray(size)
        return bytes(buffer[: self.readinto(buffer)])

    def readline(self) -> bytes:
        line = bytearray()
        while self._index < len(self._pieces) and not line.endswith(b"\n"):
            piece = self._pieces[self._index]
            end = piece.find(b"\n", self._offset)
            line += self.read((len(piece) if end < 0 else end + 1) - self._offset)
        return bytes(line)


def _loads(payload: Payload) -> Any:
    """Unpickle a payload: one buffer, or a tuple of pieces that travelled unjoined."""
    if isinstance(payload, tuple):
        return pickle.Unpickler(_PiecesReader(payload)).load()
    return pickle.loads(payload)


class PickleCodec(Codec):
    """Pickles each unit once in the client and its outcomes once in the worker.

    Args:
        pieces: payloads over 64 KB may be tuples of ``bytes`` (see
            :func:`_dumps_in_pieces`), for a transport that sends such tuples
            as they are: back to back, delivered as one buffer (the process
            backend's pipes), or as tuples (Pyro5's marshal), which this codec
            decodes without joining them. Otherwise every payload is ``bytes``.
    """

    def __init__(self, *, pieces: bool = False) -> None:
        self._dumps = _dumps_in_pieces if pieces else _dumps
        # Client side: how each task class travels (itself, or its by-value pickle), for
        # as long as the class lives.
        self._class_refs: weakref.WeakKeyDictionary[type, type | bytes] = (
            weakref.WeakKeyDictionary()
        )
        # Worker side: classes rebuilt from their by-value pickle, by that pickle, the
        # most recently used last, and the size of those pickles.
        self._classes: collections.OrderedDict[bytes, type] = collections.OrderedDict()
        self._classes_bytes = 0

    # ---------------------------------------------------------------- client side

    def encode_unit(self, tasks: Unit) -> Payload:
        # The body: (class or its by-value pickle, arguments, keyword arguments or
        # None, whether each task's arguments are its only one, bare) for a batch
        # (from map(), which means cls(*args)) or for tasks of one class that their
        # arguments rebuild (Task._from_args); else (None, the tasks), pickled whole.
        body: tuple[Any, ...]
        if isinstance(tasks, TaskBatch):
            ref = self._class_ref(tasks.cls, tasks)
            body = (ref, tasks.args, tasks.kwargs, tasks.single)
        elif len(tasks) == 1:
            task = tasks[0]
            if type(task)._from_args:
                ref = self._class_ref(type(task), tasks)
                body = (ref, [task.args], [task.kwargs] if task.kwargs else None, False)
            else:
                body = (None, tasks)
        elif (batch := TaskBatch.of(tasks)) is not None:
            body = (self._class_ref(batch.cls, tasks), batch.args, batch.kwargs, batch.single)
        else:
            body = (None, tasks)
        try:
            data = self._dumps(body)
        except Exception as exc:
            raise SerializationError(_culprit(tasks, exc)) from exc
        return data

    def _class_ref(self, cls: type[Task], tasks: Unit) -> type | bytes:
        """A class itself if workers can import it by name, else its by-value pickle."""
        known = self._class_refs.get(cls)
        if known is not None:
            return known
        ref: type | bytes = cls
        if cls.__module__ == "__main__":
            ref = b""
        else:
            try:
                pickle.dumps(cls, _PROTOCOL)
            except Exception:
                ref = b""
        if ref == b"":
            try:
                ref = _cloudpickle().dumps(cls, _PROTOCOL)
            except Exception as exc:
                raise SerializationError(
                    f"cannot serialize the task class of {_short.repr(next(iter(tasks)))}: {exc}"
                ) from exc
        self._class_refs[cls] = ref
        return ref

    def decode_results(self, payload: Payload) -> Results:
        header: bytes | memoryview
        if isinstance(payload, tuple):  # (header, *pieces): see encode_results.
            header = payload[0]
            body_data: Any = payload[1:]
        else:
            view = memoryview(payload)
            header, body_data = view[:_HEADER_BYTES], view[_HEADER_BYTES:]
        try:
            body = _loads(body_data)
        except Exception as exc:
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            ntasks = int.from_bytes(header[:_COUNT_BYTES], "little")
            message = f"the outcome of this task could not be unpickled in the client: {exc}"
            return [None] * ntasks, {
                index: RemoteTaskError(type(exc).__name__, message, text) for index in range(ntasks)
            }
        if not header[_COUNT_BYTES]:
            return body, {}
        values, failures = body
        return values, {index: failure.rebuild() for index, failure in failures.items()}

    # ---------------------------------------------------------------- worker side

    def decode_unit(self, payload: Payload) -> list[Task] | TaskBatch:
        body = _loads(payload)
        ref = body[0]
        if ref is None:
            tasks: list[Task] = body[1]
            return tasks
        cls = self._rebuilt_class(ref) if isinstance(ref, bytes) else ref
        return TaskBatch(cls, body[1], body[2], single=body[3])

    def _rebuilt_class(self, ref: bytes) -> type:
        """The class of a by-value pickle, rebuilt once while it is in use."""
        classes = self._classes
        cls: type | None = classes.get(ref)
        if cls is not None:
            classes.move_to_end(ref)
            return cls
        cls = pickle.loads(ref)
        classes[ref] = cls
        self._classes_bytes += len(ref)
        if len(classes) > _KNOWN_CLASSES or self._classes_bytes > _KNOWN_CLASS_BYTES:
            while len(classes) > 1 and (
                len(classes) > _KNOWN_CLASSES // 2 or self._classes_bytes > _KNOWN_CLASS_BYTES // 2
            ):
                self._classes_bytes -= len(classes.popitem(last=False)[0])
            # Classes live in reference cycles: only a full collection frees what they
            # hold, and a worker that makes few objects may not run one for a long time.
            gc.collect()
        return cls

    @staticmethod
    def unreadable_unit(error: Exception, ntasks: int) -> list[Task]:
        """What a worker runs for a unit that :meth:`decode_unit` failed on with ``error``:
        ``ntasks`` tasks whose outcome is a SerializationError that names the cause."""
        failure = SerializationError(f"the worker could not unpickle a unit of tasks: {error}")
        failure.__cause__ = error
        return [_Unreadable(failure) for _ in range(ntasks)]

    def encode_results(self, values: list[Any], errors: dict[int, BaseException]) -> Payload:
        failures = {index: _Failure.of(exc) for index, exc in errors.items()}
        header = len(values).to_bytes(_COUNT_BYTES, "little") + (b"\x01" if failures else b"\x00")
        try:
            data = self._dumps((values, failures) if failures else values)
        except Exception:
            # Some result cannot travel: it becomes a failure saying why, the rest go on.
            values = list(values)
            for index, value in enumerate(values):
                failure = None if index in failures else _untravelled(value)
                if failure is not None:
                    failures[index] = failure
                    values[index] = None
            data = _cloudpickle().dumps((values, failures), _PROTOCOL)
            header = header[:_COUNT_BYTES] + b"\x01"
        if isinstance(data, tuple):
            return (header, *data)
        return header + data


class _Unreadable(Task):
    """Stands for a task that the worker could not unpickle: its outcome is that error."""

    __slots__ = ("_error",)

    def __init__(self, error: BaseException) -> None:
        self._error = error

    def _run(self, escaping: ExceptionTypes = BaseException) -> Outcome:
        return (False, self._error)


def _untravelled(result: object) -> _Failure | None:
    """None if a task's result can be pickled, else the failure that says why it cannot."""
    try:
        _dumps(result)
    except Exception as exc:
        return _Failure(
            None,
            _type_name(type(result)),
            f"the task's result could not be pickled to travel back to the client: {exc}",
            "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        )
    return None


def _culprit(tasks: Unit, error: Exception) -> str:
    """Say which task, class or argument of a unit cannot be pickled."""
    dumps = _cloudpickle().dumps
    for task in tasks:
        items: list[tuple[str, object]] = [
            (f"argument {index}", value) for index, value in enumerate(task.args)
        ]
        items.extend((f"argument {key}=", value) for key, value in task.kwargs.items())
        for where, value in items:
            try:
                dumps(value, _PROTOCOL)
            except Exception as exc:
                return (
                    f"cannot serialize {where} of {_short.repr(task)}: {_short.repr(value)} "
                    f"({exc}); a task's arguments must be picklable to reach a worker process"
                )
        try:
            dumps(task, _PROTOCOL)
        except Exception as exc:
            return f"cannot serialize the task {_short.repr(task)}: {exc}"
    return f"cannot serialize a unit of {len(tasks)} task(s): {error}"
