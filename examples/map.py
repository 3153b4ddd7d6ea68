"""The README's map example: a function applied to many inputs, no Task object per input."""

from quickstart import factorize

import papyros


def power(base, exponent):  # A plain function: map makes it a Task type.
    return base**exponent


if __name__ == "__main__":
    with papyros.get_dispatcher() as dispatcher:
        results = dispatcher.map(factorize, range(2, 100_001), ordered=True, chunksize=1000)
        print("100000:", list(results)[-1])
        print("powers:", list(dispatcher.map(power, [2, 3, 10], [10, 4, 3], ordered=True)))
