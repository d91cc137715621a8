#!/usr/bin/env python
"""Run a recipe on this machine (fatscale/launch/local.py; installed: fatscale-train).

    python launch/local.py RECIPE [--nproc N] [--set key=value ...]
    python launch/local.py --demo          # the built-in end-to-end CPU run
"""

import sys
from pathlib import Path

if __name__ == "__main__":  # not in the processes that multiprocessing spawns from this script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without installing, too
    from fatscale.launch.local import main

    main()
