"""``python -m qround``: the same as the ``qround`` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
