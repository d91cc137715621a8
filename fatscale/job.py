"""The Slurm job: a picklable, checkpointable callable that submitit runs once per task.

``launch/slurm.py`` pickles a ``TrainJob`` holding the resolved recipe; every task (one per GPU,
or ``slurm.tasks_per_node`` CPU ranks per node) takes its rank and rendezvous point from Slurm
(submitit's ``TorchDistributedEnvironment``: rank 0's node is MASTER_ADDR) and runs
``fatscale.train.trainer.train``.

Preemption and time limits: Slurm sends USR2 to every task (``--signal=USR2@90`` before the time
limit; ``scancel --signal USR2`` or submitit's ``job._interrupt()`` by hand). Each task's handler
only sets a flag; the trainer sees it at the next step on all ranks at once, saves a checkpoint
and stops. Then rank 0 hands over to submitit's own USR2 handler, which calls ``checkpoint()``
below (a new ``TrainJob`` with the requeue count + 1), requeues the job with ``scontrol requeue``
and exits. The requeued job resumes from that checkpoint and continues the same MLflow run.
Requeues are bounded by ``slurm.max_requeues`` (preemptions and time limits alike).

A sweep (fatscale.sweep) is one job array of TrainJobs, one per point; each array element requeues
and resumes on its own as above (submitit's ``JobEnvironment.job_id`` is ``ARRAY_TASK``, which
``scontrol requeue`` and the failure tickets below use). A point's rank 0 records its result and
updates the sweep's MLflow parent run when it finished.

Stalls and crashes: a rank that stops making progress (fatscale.train.watchdog), or an exception
that is not the recipe's fault, requeues the job too (``scontrol requeue``, by the first rank that
gets there), up to ``slurm.max_failures`` times per job, counted apart from preemptions in
``OUTPUT_DIR/slurm/<job>.failure-<N>`` files; then the job ends with one line saying so. A recipe
error, a refused resume or a diverged loss is never retried: the same input fails the same way.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading

import submitit
import yaml

log = logging.getLogger(__name__)


class TrainJob(submitit.helpers.Checkpointable):
    def __init__(self, recipe_text: str, source: str, requeues: int = 0, sweep_dir: str | None = None):
        self.recipe_text = recipe_text  # resolved at submission: editing the file later changes nothing
        self.source = source
        self.requeues = requeues
        self.sweep_dir = sweep_dir  # a sweep's point (fatscale.sweep): its MLflow run is the sweep's child

    def __call__(self) -> dict:
        dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
        # One thread per CPU this task may run on, not one per core of the node (set here, as torch
        # may be imported already when OMP_NUM_THREADS would be read).
        cpus = len(os.sched_getaffinity(0))
        torch.set_num_threads(cpus)
        from fatscale.config import RecipeError, resolve
        from fatscale.checkpoint.resume import ResumeMismatch
        from fatscale.run_lock import RunDirBusy
        from fatscale.train.logs import setup_logging
        from fatscale.train.trainer import Interrupted, TrainingDiverged, train
        from fatscale.weights import SourceError

        recipe = resolve(yaml.safe_load(self.recipe_text), self.source)
        self.max_requeues = recipe.slurm.max_requeues  # for checkpoint(), which submitit calls in this process
        self.max_failures = recipe.slurm.max_failures
        setup_logging(dist_env.rank)
        node = os.environ.get("SLURMD_NODENAME", "")
        log.info("job %s, requeue %d: rank %d of %d on node %s (%d CPUs), master %s:%s", submitit.JobEnvironment().job_id,
                 self.requeues, dist_env.rank, dist_env.world_size, node, cpus, dist_env.master_addr,
                 dist_env.master_port)
        if self.sweep_dir is not None:
            join_sweep(self.sweep_dir)
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's: checkpoint() + scontrol requeue + exit
        stop = threading.Event()
        signal.signal(signal.SIGUSR2, lambda *_: stop.set())
        try:
            summary = train(recipe, self.recipe_text, stop, on_stall=self.requeue_after_failure)
        except Interrupted:
            if dist_env.rank == 0:
                requeue(signal.SIGUSR2, None)
            sys.exit(0)  # the other ranks: done here, rank 0 requeues the job
        except (RecipeError, ResumeMismatch, RunDirBusy, SourceError, TrainingDiverged):
            raise
        except Exception as e:
            self.requeue_after_failure(f"rank {dist_env.rank}: {type(e).__name__}: {e}")
            raise
        if self.sweep_dir is not None and dist_env.rank == 0:
            from fatscale.sweep import point_finished

            point_finished(self.sweep_dir, recipe.output_dir, summary)
        return dict(summary=summary, rank=dist_env.rank, world_size=dist_env.world_size, node=node,
                    requeues=self.requeues, cpus=cpus)

    def requeue_after_failure(self, reason: str) -> None:
        """Requeue this job after a stall or a crash (``reason``), unless it has failed
        ``slurm.max_failures`` times already. Any rank may call it; the first of this run does it."""
        env = submitit.JobEnvironment()
        folder = env.paths.folder
        try:  # one ticket per run of the job (Slurm counts the runs in SLURM_RESTART_COUNT)
            with open(folder / f"{env.job_id}.failure-{os.environ.get('SLURM_RESTART_COUNT', '0')}", "x") as ticket:
                ticket.write(reason + "\n")
        except FileExistsError:
            return  # another rank of this run is on it
        failures = len(list(folder.glob(f"{env.job_id}.failure-*")))
        if failures > self.max_failures:
            log.error("not requeued: job %s failed %d times (stalls or crashes; slurm.max_failures is %d); the logs are "
                      "in %s; resubmit to continue from the last checkpoint", env.job_id, failures, self.max_failures,
                      folder)
            return
        log.warning("job %s failed (%s): requeued after failure %d (slurm.max_failures %d); it resumes from the last "
                    "checkpoint", env.job_id, reason, failures, self.max_failures)
        subprocess.run(["scontrol", "requeue", env.job_id], check=True, timeout=60)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission | None:
        """Called by submitit on rank 0 after the trainer saved: the job to requeue, or None when
        the recipe's bound on requeues is reached (the job then ends as failed)."""
        if self.requeues >= self.max_requeues:
            log.error("not requeued: slurm.max_requeues (%d) reached; resubmit to continue from the checkpoint",
                      self.max_requeues)
            return None
        return submitit.helpers.DelayedSubmission(TrainJob(self.recipe_text, self.source, self.requeues + 1,
                                                           self.sweep_dir))


def join_sweep(sweep_dir: str) -> None:
    """A point's new MLflow run becomes a child of the sweep's parent run, when there is one yet
    (else the first summary update tags it)."""
    from fatscale.sweep import parent_run_id
    from fatscale.tracking.tags import PARENT_RUN_ENV

    parent = parent_run_id(sweep_dir)
    if parent is not None:
        os.environ[PARENT_RUN_ENV] = parent
