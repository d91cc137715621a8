#!/usr/bin/env python
"""ImageNet (class-per-folder tree) to WebDataset shards (fatscale/prep/; installed: fatscale-shards).

    python data_prep/make_shards.py --src IMAGENET_ROOT --out SHARD_DIR
    python data_prep/make_shards.py --verify SHARD_DIR
"""

import sys
from pathlib import Path

if __name__ == "__main__":  # not in the processes that multiprocessing spawns from this script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without installing, too
    from fatscale.prep.cli import main

    main()
