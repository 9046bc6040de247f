"""``python -m flywheel`` and ``python -m flywheel.cli``: the ``flywheel`` command."""

import sys

from flywheel.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
