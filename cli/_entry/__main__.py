"""``python -m flywheel``: the ``flywheel`` command (flywheel.cli)."""

import sys

from flywheel.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
