"""``python -m jsoftmax verify``: see :mod:`jsoftmax._cli`."""

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
