#!/usr/bin/env python
"""Submit a recipe to Slurm (fatscale/launch/slurm.py; installed: fatscale-slurm).

    python launch/slurm.py RECIPE --nodes N|MIN-MAX [...] [--dry-run]
    python launch/slurm.py RECIPE --sweep KEY=V1,V2,... [...]
    python launch/slurm.py --status SWEEP_DIR
"""

import sys
from pathlib import Path

if __name__ == "__main__":  # not in the processes that multiprocessing spawns from this script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without installing, too
    from fatscale.launch.slurm import main

    main()
