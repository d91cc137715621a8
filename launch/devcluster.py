#!/usr/bin/env python
"""A throw-away multi-node Slurm cluster on this machine (fatscale/tryout/devcluster.py; installed:
fatscale-devcluster).

    python launch/devcluster.py start [--dir DIR] [--nodes N] [--cpus-per-node C]
    python launch/devcluster.py status [--dir DIR]
    python launch/devcluster.py stop [--dir DIR]
"""

import sys
from pathlib import Path

if __name__ == "__main__":  # not in the processes that multiprocessing spawns from this script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without installing, too
    from fatscale.tryout.devcluster import main

    main()
