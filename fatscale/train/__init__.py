"""Training: one recipe, any number of ranks (CPU with gloo, GPUs with NCCL).

    torchrun --nproc-per-node N -m fatscale.train RECIPE [--set key=value ...]
    (or launch/local.py, launch/slurm.py, which set the distributed environment)

trainer.py       Trainer: the components built from the recipe, ``train()`` the loop
checkpointer.py  Checkpointer: when to save, what a checkpoint holds, resume
state.py         TrainState (epoch, step, best top-1, MLflow run id, time) and RNG states
components.py    model, optimizer, LR schedule, DeepSpeed configuration, loss
evaluation.py    top-1/top-5 over the val split
reporting.py     Reporter: log lines and the MLflow run
distributed.py   process group, node layout, decisions all ranks take together, the output dir lock
logs.py          console and train.log handlers
cli.py           the command line (``python -m fatscale.train``)
"""
