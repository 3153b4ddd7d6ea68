"""The README's distributed quickstart: the client, once the dispatcher and workers run."""

import papyros


@papyros.Task.subclass()
def square(x):
    return x * x


if __name__ == "__main__":
    with papyros.get_dispatcher("pyro") as dispatcher:  # The group "default".
        print(sum(dispatcher.execute((square(i) for i in range(10_000)), chunksize=100)))
        print(dispatcher.get_stats()["tasks_done"] >= 10_000)
