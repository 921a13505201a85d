"""``python -m broker.bench``: the same as ``broker bench``."""

import sys

from broker.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
