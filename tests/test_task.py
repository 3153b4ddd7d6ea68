"""Tasks on their own: the decorator, execution, results, pickling."""

from __future__ import annotations

import pickle

import pytest

import papyros
from papyros.task import TaskBatch
from tests.tasks import add, annotated_failure, fail_if_odd, square


def test_the_decorator_makes_a_task_class_named_after_the_function() -> None:
    assert isinstance(square, type)
    assert issubclass(square, papyros.Task)
    assert square.__name__ == "square"
    assert square.__module__ == "tests.tasks"
    task = square(4)
    assert task.args == (4,)
    assert task.kwargs == {}


def test_subclass_called_with_a_name_leaves_the_function_alone() -> None:
    def cube(x: int) -> int:
        return x**3

    Cube = papyros.Task.subclass()(cube, "Cube")
    assert Cube.__name__ == "Cube"
    assert cube.__name__ == "cube"
    assert cube(2) == 8
    task = Cube(2)
    task.execute()
    assert task.result() == 8


def test_unknown_options_fail_at_decoration_time() -> None:
    with pytest.raises(ValueError, match="retries"):
        papyros.Task.subclass(retries=3)
    for limit in (-1, 0, float("inf"), float("nan"), True, "1"):
        with pytest.raises(ValueError, match="time_limit"):
            papyros.Task.subclass(time_limit=limit)
    with pytest.raises(TypeError):
        papyros.Task.subclass()(42)  # type: ignore[arg-type]


def test_execute_then_result() -> None:
    task = add(2, y=3)
    with pytest.raises(papyros.UnprocessedTaskError):
        task.result()
    task.execute()
    assert task.result() == 5
    assert isinstance(papyros.UnprocessedTaskError(), papyros.PapyrosError)


def test_result_reraises_the_stored_exception() -> None:
    task = fail_if_odd(1)
    task.execute()
    with pytest.raises(ValueError, match="odd: 1"):
        task.result()


def test_task_and_traceback_attributes() -> None:
    task = annotated_failure(3)
    task.execute()
    with pytest.raises(KeyError) as info:
        task.result()
    assert repr(info.value.task) == "tests.tasks.annotated_failure(3)"  # type: ignore[attr-defined]
    assert info.value.task is not task  # type: ignore[attr-defined]
    traceback_text = info.value.traceback  # type: ignore[attr-defined]
    assert "raise KeyError(x)" in traceback_text
    assert "_run" not in traceback_text


def test_exceptions_are_bare_without_the_options() -> None:
    task = fail_if_odd(1)
    task.execute()
    with pytest.raises(ValueError, match="odd") as info:
        task.result()
    assert not hasattr(info.value, "task")
    assert not hasattr(info.value, "traceback")


def test_repr_shows_module_name_and_arguments() -> None:
    assert repr(add(1, y="two")) == "tests.tasks.add(1, y='two')"
    assert repr(square(3)) == "tests.tasks.square(3)"


def test_tasks_pickle_by_reference_with_their_outcome() -> None:
    task = add(1, y=2)
    clone = pickle.loads(pickle.dumps(task))
    assert type(clone) is add
    assert (clone.args, clone.kwargs) == ((1,), {"y": 2})
    task.execute()
    assert pickle.loads(pickle.dumps(task)).result() == 3
    assert pickle.loads(pickle.dumps(square)) is square


def test_a_subclass_with_its_own_execute() -> None:
    class Power(papyros.Task):
        def _execute(self, base: int, exponent: int) -> int:
            return int(base**exponent)

    task = Power(2, 10)
    task.execute()
    assert task.result() == 1024

    bare = papyros.Task()
    bare.execute()
    with pytest.raises(NotImplementedError):
        bare.result()


@pytest.mark.parametrize(
    ("tasks", "single", "args", "kwargs"),
    [
        pytest.param([add(1), add(2)], True, [1, 2], None, id="one-argument-bare"),
        pytest.param([add((1, 2)), add(3)], True, [(1, 2), 3], None, id="a-tuple-argument"),
        pytest.param([add(1, 2), add(3)], False, [(1, 2), (3,)], None, id="two-arguments"),
        pytest.param([add(1), add()], False, [(1,), ()], None, id="no-argument"),
        pytest.param([add(1), add(2, y=3)], False, [(1,), (2,)], [{}, {"y": 3}], id="keywords"),
    ],
)
def test_a_batch_holds_the_arguments_that_rebuild_its_tasks(
    tasks: list[papyros.Task],
    single: bool,
    args: list[object],
    kwargs: list[dict[str, object]] | None,
) -> None:
    batch = TaskBatch.of(tasks)
    assert batch is not None
    assert (batch.cls, batch.single, batch.args, batch.kwargs) == (add, single, args, kwargs)
    assert [(task.args, task.kwargs) for task in batch] == [(t.args, t.kwargs) for t in tasks]


def test_only_tasks_of_one_class_that_their_arguments_rebuild_make_a_batch() -> None:
    class Stateful(papyros.Task):
        def __init__(self, value: int) -> None:
            super().__init__(value)
            self.value = value

    assert TaskBatch.of([add(1), square(2)]) is None
    assert TaskBatch.of([add(1), "not a task"]) is None
    assert TaskBatch.of([Stateful(1), Stateful(2)]) is None
    assert TaskBatch.of([]) is None
