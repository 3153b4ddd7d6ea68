"""Run from this folder: get_dispatcher() reads the papyros.toml beside it."""

import papyros

if __name__ == "__main__":
    with papyros.get_dispatcher() as dispatcher:
        print(dispatcher)
