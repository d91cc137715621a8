"""The launchers: ``local`` (the ranks of one machine, torchrun-style, or the CPU demo) and ``slurm``
(submitit jobs and job arrays). ``python launch/local.py`` and ``python launch/slurm.py`` run them from
a checkout; installed, ``fatscale-train`` and ``fatscale-slurm`` do."""
