"""`python -m dsv3 ...`: the `dsv3` command (also how to launch it under torchrun)."""

import sys

from dsv3.cli import main

if __name__ == "__main__":
    sys.exit(main())
