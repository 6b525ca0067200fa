"""``python -m jaxserve.serve``: see ``jaxserve.serve.cli``."""

import sys

from jaxserve.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
