"""``python -m papyros``: the same as the ``start-papyros`` command."""

from __future__ import annotations

import sys

from papyros.cli import main

if __name__ == "__main__":
    sys.exit(main())
