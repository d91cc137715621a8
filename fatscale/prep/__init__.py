"""ImageNet (or any class-per-folder image tree) to WebDataset tar shards.

``python data_prep/make_shards.py --src IMAGENET_ROOT --out SHARD_DIR`` writes
``train-000000.tar ...`` / ``val-000000.tar ...`` with one sample per image
(``<key>.cls`` label as decimal text, ``<key>.jpg`` baseline RGB JPEG, ``<key>.json`` metadata),
a DALI index (``wds2idx`` format, fatscale.data.shard_format) next to every shard, and
``manifest.json`` (schema in :mod:`fatscale.data.manifest`). ``--verify SHARD_DIR`` re-reads
everything against the manifest. docs/data.md has the user's view.

One job per module, in the order a run goes through them:

* ``source``, ``labels``: the tree's splits, class folders and files, each with its label
  (class folders, or a labels file for a flat val/), and the class names;
* ``plan``: which file goes into which shard, a pure function of the file list and the
  arguments (so that a resumed run is byte-identical to an uninterrupted one);
* ``state``: ``SHARD_DIR/.make_shards/``, the parameters, one commit record per shard and the
  lock, which make a run resumable;
* ``jpeg``, ``encode``: the bytes of one sample: a baseline JPEG passes through after its
  markers are checked, anything else is re-encoded by Pillow or skipped with the reason;
* ``build``: one shard per task, written by this process and ``--workers - 1`` children;
* ``make``: ``make_shards``, from the scan to the manifest; ``verify``: ``--verify``;
* ``slurm``: ``--slurm-tasks N``, the same shards built by a Slurm job array (submitit);
* ``errors``: whose fault a failure is, and one-line messages; ``cli``: the command line.

Nothing here imports torch or DALI (timm only for trees of ImageNet class ids, for the names).
"""

from fatscale.prep.errors import MakeShardsError, RunStopped
from fatscale.prep.make import make_shards
from fatscale.prep.verify import verify_shards

__all__ = ["MakeShardsError", "RunStopped", "make_shards", "verify_shards"]
