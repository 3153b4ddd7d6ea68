"""Tasks: a function and the arguments to call it with, run later somewhere else."""

from __future__ import annotations

import contextlib
import copy
import copyreg
import itertools
import math
import traceback
from collections.abc import Callable, Iterator
from itertools import repeat
from operator import attrgetter, countOf
from typing import Any, ClassVar, TypeAlias, TypeVar

from papyros.errors import UnprocessedTaskError

__all__ = [
    "Encoded",
    "ExceptionTypes",
    "Outcome",
    "Results",
    "Task",
    "TaskBatch",
    "Unit",
    "outcomes_of",
]

#: Exception classes, as ``except`` takes them.
ExceptionTypes: TypeAlias = "type[BaseException] | tuple[type[BaseException], ...]"

_E = TypeVar("_E", bound=BaseException)

#: What running a task produced: ``(True, result)`` or ``(False, exception)``.
Outcome: TypeAlias = tuple[bool, Any]

#: What running a unit of tasks produced, compactly: every task's result in
#: order (None where it raised), and the exceptions raised, by position.
Results: TypeAlias = tuple[list[Any], dict[int, BaseException]]

# Marks a task that has not been executed (None is a valid result).
_UNPROCESSED: Outcome = (False, None)


class Task:
    """A unit of work: a callable and the positional and keyword arguments to pass it.

    Subclass it and override :meth:`_execute`, or, more simply, decorate a
    function with :meth:`Task.subclass`::

        @papyros.Task.subclass()
        def square(x):
            return x * x

        task = square(3)        # a Task holding args=(3,)
        task.execute()          # runs it here and stores the outcome
        task.result()           # 9

    A subclass may have its own ``__init__`` and instance state: its tasks are
    then pickled whole, with their state (see ``_from_args``), so a worker runs
    the very task that was made.

    Class options, set through :meth:`subclass` keywords:

    - ``task_attr`` (default False): an exception raised by the task gets a
      ``.task`` attribute, a fresh copy of the failed task.
    - ``traceback_attr`` (default False): an exception raised by the task gets
      a ``.traceback`` attribute, the traceback where it was raised, as text.
    - ``time_limit`` (default None): seconds a single run of the task may take
      on a backend that can enforce it (the process backend kills the worker
      and the outcome is a :class:`~papyros.TimeoutError`).
    """

    __slots__ = ("_outcome", "args", "kwargs")

    task_attr: ClassVar[bool] = False
    traceback_attr: ClassVar[bool] = False
    time_limit: ClassVar[float | None] = None

    # The class options that Task.subclass() accepts.
    _OPTIONS: ClassVar[frozenset[str]] = frozenset({"task_attr", "traceback_attr", "time_limit"})

    #: Whether a task of this class is all in its ``args`` and ``kwargs``, so that
    #: ``cls(*task.args, **task.kwargs)`` rebuilds it: the class adds no ``__init__``,
    #: ``__new__`` or ``__reduce__`` of its own, and no instance state (no ``__dict__``,
    #: no slot). Its tasks then travel as their arguments alone; any other task
    #: travels whole, with standard pickle semantics. Set for each class as it is made.
    _from_args: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._from_args = (
            cls.__init__ is Task.__init__
            and cls.__new__ is Task.__new__
            and cls.__reduce__ is Task.__reduce__
            and cls.__dictoffset__ == 0
            and cls.__basicsize__ == Task.__basicsize__
        )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # ``_outcome`` stays unset until the task runs: one store less per task made.
        self.args = args
        self.kwargs = kwargs

    def _execute(self, *args: Any, **kwargs: Any) -> Any:
        """Compute the task's result; called with the task's own arguments."""
        raise NotImplementedError(f"{type(self).__name__} must override _execute()")

    def execute(self) -> None:
        """Run the task here, now, and store its result or exception for :meth:`result`."""
        self._outcome = self._run()

    def result(self) -> Any:
        """Return the stored result, or re-raise the stored exception.

        Raises:
            UnprocessedTaskError: the task has not been executed.
        """
        outcome = getattr(self, "_outcome", _UNPROCESSED)
        if outcome is _UNPROCESSED:
            raise UnprocessedTaskError(f"{self!r} has not been executed")
        ok, value = outcome
        if ok:
            return value
        raise value

    def _run(self, escaping: ExceptionTypes = BaseException) -> Outcome:
        """Run the task and return its outcome, leaving the task itself untouched.

        An exception the task raises is its outcome, unless it is not an
        ``Exception`` (SystemExit, KeyboardInterrupt...) and is one of
        ``escaping``: that one propagates.
        """
        try:
            return (True, self._execute(*self.args, **self.kwargs))
        except BaseException as exc:
            _check_escaping(exc, escaping)
            error = _stopped(exc) if isinstance(exc, StopIteration) else exc
            return (False, type(self)._annotate(error, self.args, self.kwargs, self))

    @classmethod
    def _annotate(
        cls,
        exc: _E,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        task: Task | None = None,
    ) -> _E:
        """Give a task's exception the attributes its class options ask for.

        The task is ``task`` if it exists, else the one made by ``cls(*args, **kwargs)``.
        """
        if cls.traceback_attr:
            # Skip the frame that ran the task: the traceback starts in the task's own code.
            tb = exc.__traceback__.tb_next if exc.__traceback__ else None
            _attach(exc, "traceback", "".join(traceback.format_exception(type(exc), exc, tb)))
        if cls.task_attr:
            _attach(exc, "task", cls(*args, **kwargs) if task is None else task._fresh_copy())
        return exc

    def _fresh_copy(self) -> Task:
        """A copy of this task, with its own state but no stored outcome."""
        if type(self)._from_args:
            return type(self)(*self.args, **self.kwargs)
        clone = copy.copy(self)
        if hasattr(clone, "_outcome"):
            del clone._outcome
        return clone

    @classmethod
    def _run_many(
        cls,
        args_list: list[Any],
        kwargs_list: list[dict[str, Any]] | None = None,
        *,
        single: bool = False,
        escaping: ExceptionTypes = BaseException,
    ) -> Results:
        """Run a task of this class for each set of arguments; their results, in order.

        The same as making each task and calling its ``_run``, without making
        the tasks when the class wraps a plain function (a chunk's fast path:
        the calls run in one generator, resumed after a task that raises).
        With ``single``, ``args_list`` holds each task's only argument, bare.
        A task's exception is its outcome, unless it is not an ``Exception``
        (SystemExit, KeyboardInterrupt...) and is one of ``escaping``: that one
        propagates, and the results are lost.
        """
        values: list[Any] = []
        errors: dict[int, BaseException] = {}
        # Where the class is a plain function's (``plain``), its tasks need not be
        # made to run them: the function is called on their arguments.
        function = cls.__dict__.get("_papyros_function")
        plain = isinstance(function, staticmethod) and cls._execute is function.__func__
        execute: Callable[..., Any] = cls._execute
        if plain and kwargs_list is None:
            # The calls run in a generator rather than in map(), for two reasons: a
            # task's StopIteration comes out of it as a RuntimeError (PEP 479), where
            # extend() would take it for the end of the calls; and after a task
            # raised, a new generator over ``todo`` goes on with the task after it.
            todo = iter(args_list)
            while True:
                calls = (
                    (execute(args) for args in todo)
                    if single
                    else (execute(*args) for args in todo)
                )
                try:
                    values.extend(calls)
                    return values, errors
                except BaseException as exc:
                    _check_escaping(exc, escaping)
                    error: BaseException = exc
                index = len(values)
                tb = error.__traceback__
                stop = error.__cause__
                if tb is not None and tb.tb_next is None and isinstance(stop, StopIteration):
                    # Raised here, by the generator that ended: a task raised StopIteration.
                    error = _stopped(stop)
                elif tb is not None and tb.tb_next is not None:
                    # Raised in a task: its traceback goes on from the generator's frame,
                    # which stands for Task._run's (the frame that _annotate skips).
                    error = error.with_traceback(tb.tb_next)  # Past any __setattr__.
                args = (args_list[index],) if single else args_list[index]
                errors[index] = cls._annotate(error, args, {})
                values.append(None)
        if single:
            args_list = list(zip(args_list))
        kwargs_list = kwargs_list or [{}] * len(args_list)
        for index, (args, kwargs) in enumerate(zip(args_list, kwargs_list, strict=True)):
            if plain:
                try:
                    values.append(execute(*args, **kwargs))
                except BaseException as exc:
                    _check_escaping(exc, escaping)
                    error = _stopped(exc) if isinstance(exc, StopIteration) else exc
                    errors[index] = cls._annotate(error, args, kwargs)
                    values.append(None)
            else:
                ok, value = cls(*args, **kwargs)._run(escaping)
                values.append(value if ok else None)
                if not ok:
                    errors[index] = value
        return values, errors

    def __repr__(self) -> str:
        cls = type(self)
        parts = [repr(arg) for arg in self.args]
        parts.extend(f"{key}={value!r}" for key, value in self.kwargs.items())
        return f"{cls.__module__}.{cls.__qualname__}({', '.join(parts)})"

    def __reduce__(self) -> tuple[Any, ...]:
        cls = type(self)
        if not cls._from_args:
            # Pickled as object.__reduce_ex__ would: the state, and no __init__ call.
            return (copyreg.__newobj__, (cls,), _state_of(self))  # type: ignore[attr-defined]
        outcome = getattr(self, "_outcome", _UNPROCESSED)
        state = None if outcome is _UNPROCESSED else outcome
        if not self.kwargs and state is None:
            return (cls, self.args)
        return (_rebuild_task, (cls, self.args, self.kwargs, state))

    @classmethod
    def subclass(cls, **class_options: Any) -> _TaskFactory:
        """Return a decorator that turns a function into a subclass of this Task class.

        Usable as ``@Task.subclass()`` on a function, or as
        ``Task.subclass()(func, "Name")`` to make a class called ``Name`` and
        leave ``func`` as it is. The class takes the function's module and
        docstring, so a class bound to a module-level name pickles by reference.

        Args:
            **class_options: class options (see the class docstring).

        Raises:
            ValueError: an unknown option (at decoration time, not at run time).
        """
        unknown = sorted(set(class_options) - cls._OPTIONS)
        if unknown:
            raise ValueError(
                f"unknown Task option(s) {', '.join(map(repr, unknown))}; "
                f"the options are {', '.join(sorted(cls._OPTIONS))}"
            )
        limit = class_options.get("time_limit")
        if limit is not None and (
            isinstance(limit, bool)
            or not isinstance(limit, (int, float))
            or not 0 < limit < math.inf  # Also refuses NaN.
        ):
            raise ValueError(
                f"time_limit must be a positive, finite number of seconds (or None), not {limit!r}"
            )
        return _TaskFactory(cls, class_options)


def _state_of(task: Task) -> Any:
    """A task's state for pickle: its ``__getstate__()``, as ``object.__reduce_ex__`` takes it."""
    getstate = getattr(task, "__getstate__", None)
    if getstate is not None:  # Always, from Python 3.11: object.__getstate__ knows slots too.
        return getstate()
    # Python 3.10, where object has no __getstate__: a dict and the slots' values, if any.
    slots = {
        name: getattr(task, name)
        for name in copyreg._slotnames(type(task))  # type: ignore[attr-defined]
        if hasattr(task, name)
    }
    return (getattr(task, "__dict__", None) or None, slots)


def _attach(exc: BaseException, name: str, value: Any) -> None:
    """Give a task's exception an attribute, even if its class refuses new ones (a frozen
    dataclass does); one that cannot take it at all (a read-only property) goes without."""
    with contextlib.suppress(Exception):
        object.__setattr__(exc, name, value)


def _stopped(stop: StopIteration) -> RuntimeError:
    """The outcome of a task that raised ``stop``: a RuntimeError, as in a generator (PEP 479).

    Raised as it is, a task's StopIteration would end the loop of whoever takes the
    task's outcome, and lose the results after it."""
    error = RuntimeError("the task raised StopIteration")
    error.__cause__ = stop
    # Both tracebacks start where the task's own code does: the RuntimeError's as any
    # task's exception's (from the frame that ran the task, which _annotate skips), and
    # its cause's, shown whole in the RuntimeError's, one frame further.
    tb = stop.__traceback__
    if tb is not None and tb.tb_next is not None:
        stop.with_traceback(tb.tb_next)
    return error.with_traceback(tb)


def _check_escaping(error: BaseException, escaping: ExceptionTypes) -> None:
    """Raise ``error`` again if it must escape a run of tasks (see ``Task._run_many``)."""
    if not isinstance(error, Exception) and isinstance(error, escaping):
        raise error


def _rebuild_task(
    cls: type[Task], args: tuple[Any, ...], kwargs: dict[str, Any], outcome: Outcome | None
) -> Task:
    task = cls(*args, **kwargs)
    if outcome is not None:
        task._outcome = outcome
    return task


class _TaskFactory:
    """The decorator returned by :meth:`Task.subclass`."""

    __slots__ = ("_base", "_options")

    def __init__(self, base: type[Task], options: dict[str, Any]) -> None:
        self._base = base
        self._options = options

    def __call__(self, func: Callable[..., Any], name: str | None = None) -> type[Task]:
        if not callable(func):
            raise TypeError(f"Task.subclass() decorates a callable, not {func!r}")
        name = name or getattr(func, "__name__", None) or type(func).__name__
        qualname = getattr(func, "__qualname__", name)
        # Keep the function's nesting (e.g. "outer.<locals>.") so that a class
        # made inside a function is known not to be importable by reference.
        qualname = qualname.rpartition(".")[0] + "." + name if "." in qualname else name
        namespace: dict[str, Any] = {
            "__slots__": (),
            "__module__": getattr(func, "__module__", None) or "__main__",
            "__qualname__": qualname,
            "__doc__": getattr(func, "__doc__", None),
            # A static method: running a task costs one call, not two.
            "_execute": staticmethod(func),
            # Marks the class as the function's own (see _run_many).
            "_papyros_function": staticmethod(func),
            **self._options,
        }
        return type(name, (self._base,), namespace)


class TaskBatch:
    """Tasks of one class, held as their arguments: a compact unit, ready to run.

    ``args`` holds each task's positional arguments as a tuple or, when
    ``single`` is true, each task's only argument as it is (one tuple less per
    task to make, pickle and unpickle). Iterating over it makes the tasks;
    :meth:`run` runs them without doing so.
    """

    __slots__ = ("args", "cls", "kwargs", "single")

    def __init__(
        self,
        cls: type[Task],
        args: list[Any],
        kwargs: list[dict[str, Any]] | None = None,
        *,
        single: bool = False,
    ) -> None:
        self.cls = cls
        self.args = args
        self.kwargs = kwargs
        self.single = single

    @classmethod
    def of(cls, tasks: list[Any]) -> TaskBatch | None:
        """``tasks`` as a batch, if they are all of one class that their arguments rebuild
        (``Task._from_args``): they then travel and run as their arguments alone. Else None.

        Where each task has one argument and no keyword, the batch holds them bare.
        """
        if not tasks:
            return None
        first = type(tasks[0])
        if not (
            isinstance(tasks[0], Task)
            and first._from_args
            and countOf(map(type, tasks), first) == len(tasks)
        ):
            return None
        # The common case in one pass (a comprehension reads a slot faster than
        # attrgetter): one argument and no keyword for every task.
        try:
            bare = [arg for task in tasks if not task.kwargs for (arg,) in (task.args,)]
        except (TypeError, ValueError):  # A task has not exactly one argument.
            bare = []
        if len(bare) == len(tasks):
            return cls(first, bare, single=True)
        kwargs = list(map(_kwargs, tasks)) if any(map(_kwargs, tasks)) else None
        return cls(first, list(map(_args, tasks)), kwargs)

    def extend(self, other: TaskBatch) -> None:
        """Append the tasks of ``other``, a batch of the same class."""
        args = other.args
        if self.single != other.single:
            # Bare arguments become 1-tuples when the forms differ.
            if self.single:
                self.args, self.single = list(zip(self.args)), False
            else:
                args = list(zip(args))
        if self.kwargs is None and other.kwargs is not None:
            self.kwargs = [{}] * len(self.args)
        if self.kwargs is not None:
            self.kwargs += other.kwargs or [{}] * len(args)
        self.args += args

    def run(self, escaping: ExceptionTypes = BaseException) -> Results:
        """Run the tasks (see :meth:`Task._run_many`, which says what ``escaping`` is)."""
        return self.cls._run_many(self.args, self.kwargs, single=self.single, escaping=escaping)

    def __len__(self) -> int:
        return len(self.args)

    def __iter__(self) -> Iterator[Task]:
        cls = self.cls
        args = zip(self.args) if self.single else self.args
        if self.kwargs is None:
            return itertools.starmap(cls, args)
        return (cls(*each, **kwargs) for each, kwargs in zip(args, self.kwargs, strict=True))


_args = attrgetter("args")
_kwargs = attrgetter("kwargs")


def outcomes_of(values: list[Any], errors: dict[int, BaseException]) -> list[Outcome]:
    """The outcome of each task, from a unit's compact :data:`Results`."""
    outcomes = list(zip(repeat(True), values))
    for index, error in errors.items():
        outcomes[index] = (False, error)
    return outcomes


#: A unit of work in a client: tasks, or tasks of one class held as their arguments.
Unit: TypeAlias = "list[Task] | TaskBatch"

#: A unit ready to send: its payload (see :class:`~papyros.worker.Codec`) and its number of tasks.
Encoded: TypeAlias = tuple[Any, int]
