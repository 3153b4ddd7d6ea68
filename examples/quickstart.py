"""The README's quickstart: factorise numbers on whatever backend is configured."""

import papyros


@papyros.Task.subclass()
def factorize(n):
    factors, divisor = [], 2
    while divisor * divisor <= n:
        while n % divisor == 0:
            factors.append(divisor)
            n //= divisor
        divisor += 1
    return [*factors, n] if n > 1 else factors


if __name__ == "__main__":  # Needed where workers are started by importing this file.
    with papyros.get_dispatcher() as dispatcher:
        tasks = (factorize(n) for n in range(2, 100_001))
        results = dispatcher.execute(tasks, ordered=True, chunksize=1000)
        for n, factors in zip(range(2, 100_001), results, strict=True):
            if n % 20_000 == 0:
                print(n, factors)
