"""Tools for trying fatscale without a cluster or ImageNet, not part of the training runtime:
``demo_data`` (the generated textures image set of the end-to-end demo) and ``devcluster`` (a
throw-away multi-node Slurm cluster on this machine, for ``launch/slurm.py`` and the tests)."""
