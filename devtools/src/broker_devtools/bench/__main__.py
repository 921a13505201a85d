"""``python -m broker_devtools.bench``: the same as ``broker bench``."""

import sys

from broker_devtools.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
