"""``python -m robustness`` (and ``torchrun -m robustness``): the ``dsn-robust`` command, for launchers that take a
module rather than a console script."""
import sys

from robustness.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
