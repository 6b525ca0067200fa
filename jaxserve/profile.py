"""``python -m jaxserve.profile --model <hf dir> --out profile.json``: profile the engine's step
times for the simulator's fitted cost model. The work is in ``jaxserve.calibration``."""

import sys

from jaxserve.calibration.cli import main

if __name__ == "__main__":
    sys.exit(main())
