"""``python -m remixer``: see ``remixer.cli``."""

import sys

from remixer.cli import main

if __name__ == "__main__":
    sys.exit(main())
