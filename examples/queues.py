"""The README's queue example: push tasks, pop outcomes, handle failures."""

import papyros


@papyros.Task.subclass()
def inverse(x):
    return 1 / x


if __name__ == "__main__":
    with papyros.get_dispatcher() as dispatcher, dispatcher.make_queue() as queue:
        for x in [1, 2, 0, 4]:
            queue.push(inverse(x))
        for _ in range(4):
            try:
                print("result:", queue.pop(timeout=10))
            except ZeroDivisionError as exc:
                print("failed:", exc)
