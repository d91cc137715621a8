#!/usr/bin/env python
"""ImageNet (class-per-folder tree) to WebDataset shards; see fatscale/prep/ and README.

    python data_prep/make_shards.py --src IMAGENET_ROOT --out SHARD_DIR
    python data_prep/make_shards.py --verify SHARD_DIR
"""

import os
import sys

if __name__ == "__main__":
    # Runnable as `python data_prep/make_shards.py` from a checkout without installing fatscale.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fatscale.prep.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
