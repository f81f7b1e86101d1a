"""``python -m emberfl``: the same as the ``emberfl`` command."""

import sys

from emberfl.cli import console_main

# Worker processes are spawned and import the main module under another name; the
# guard keeps them from running the command again.
if __name__ == "__main__":
    sys.exit(console_main())
