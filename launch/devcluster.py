#!/usr/bin/env python
"""A throw-away multi-node Slurm cluster on this machine; see fatscale/tryout/devcluster.py and README.

    python launch/devcluster.py start [--dir DIR] [--nodes N] [--cpus-per-node C]
    python launch/devcluster.py status [--dir DIR]
    python launch/devcluster.py stop [--dir DIR]
"""

import os
import sys

if __name__ == "__main__":
    # Runnable as `python launch/devcluster.py` from a checkout without installing fatscale.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fatscale.tryout.devcluster import main  # noqa: E402

if __name__ == "__main__":
    main()
