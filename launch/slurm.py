#!/usr/bin/env python
"""Submit a recipe to Slurm through submitit; the job requeues and resumes by itself.

    python launch/slurm.py RECIPE --nodes N [--gpus-per-node G] [--tasks-per-node T]
        [--partition P] [--account A] [--qos Q] [--time D-HH:MM:SS] [--cpus-per-task C]
        [--mem M] [--constraint C] [--exclusive] [--gres] [--set key=value ...] [--dry-run]

Cluster settings come from the recipe's ``slurm`` section; flags override it and are validated
with the recipe. Before anything is queued: the recipe and overrides validate, the manifest and
every shard are readable from here, every rank of the requested nodes x tasks has a batch to
train, the output directory is writable and not in use by a queued or running job or a live run,
a checkpoint there was made by a compatible recipe, and the MLflow tracking server answers (a
warning if not). Any failure is one line on stderr and nothing is submitted. The job itself is
``fatscale.job.TrainJob``.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing, too

# Light modules only (no torch, timm or DALI), so that --help and a bad recipe answer at once;
# fatscale.resume, submitit and the job are imported where they are used (BENCHMARKS.md, "Startup").
from fatscale.config import (Recipe, RecipeError, add_recipe_arguments, check_world, dump, load_recipe,  # noqa: E402
                             slurm_minutes)
from fatscale.data.manifest import Manifest, load_manifest  # noqa: E402
from fatscale.run_lock import RunDirBusy, check_free  # noqa: E402
from fatscale.tracking import browse_command, tracking_uri  # noqa: E402

# flag -> recipe key (slurm section); strings are passed as JSON so YAML keeps them strings
FLAGS = {
    "nodes": int, "gpus_per_node": int, "tasks_per_node": int, "partition": str, "account": str, "qos": str,
    "time": str, "cpus_per_task": int, "mem": str, "constraint": str,
}


class PreflightError(RuntimeError):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_recipe_arguments(parser)
    for name, kind in FLAGS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, metavar=name.upper())
    parser.add_argument("--exclusive", action="store_true", default=None)
    parser.add_argument("--gres", action="store_true", default=None,
                        help="ask for GPUs as --gres=gpu:N (clusters without select/cons_tres)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script and the resolved recipe")
    return parser.parse_args(argv)


def resolve_recipe(args: argparse.Namespace) -> Recipe:
    """The recipe with its overrides and flags, paths made absolute, the tracking URI fixed."""
    overrides = list(args.overrides)
    for name in [*FLAGS, "exclusive", "gres"]:
        value = getattr(args, name)
        if value is not None:
            overrides.append(f"slurm.{name}={json.dumps(value)}")
    recipe = load_recipe(args.recipe, overrides)
    # The job runs elsewhere, perhaps in another directory: pin what it must find.
    output_dir = str(Path(recipe.output_dir).resolve())
    return dataclasses.replace(
        recipe, output_dir=output_dir,
        data=dataclasses.replace(recipe.data, shards=str(Path(recipe.data.shards).resolve())),
        model=dataclasses.replace(recipe.model, init_from=_absolute(recipe.model.init_from)),
        tracking=dataclasses.replace(recipe.tracking, uri=tracking_uri(recipe.tracking.uri, output_dir)))


def _absolute(source: str | None) -> str | None:
    return source if source is None or source.startswith("models:/") else str(Path(source).resolve())


def check_shards(recipe: Recipe) -> Manifest:
    manifest = load_manifest(recipe.data.shards)
    for split in ("train", "val"):
        for shard in manifest.splits[split].shards:
            for name in (shard.path, shard.index):
                path = Path(recipe.data.shards, name)
                if not os.access(path, os.R_OK):
                    raise PreflightError(f"data.shards: {path} is missing or not readable")
            size = Path(recipe.data.shards, shard.path).stat().st_size
            if size != shard.bytes:
                raise PreflightError(f"data.shards: {shard.path} has {size} bytes, the manifest says {shard.bytes}")
    return manifest


def check_output_dir(recipe: Recipe, folder: Path, manifest: Manifest, world_size: int) -> str | None:
    """Writable, no queued or running job of ours and no live run uses it, and a checkpoint in it
    may be resumed by this recipe. Returns a note when it holds a run that the job will resume."""
    output_dir = Path(recipe.output_dir)
    existing = next(p for p in (output_dir, *output_dir.parents) if p.exists())
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise PreflightError(f"output_dir: {output_dir} is not writable ({existing} is not a writable directory)")
    job_file = folder / "job_id"
    if job_file.exists():
        job_id = job_file.read_text().strip()
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()
        if state:
            raise PreflightError(f"output_dir: job {job_id} ({state}) already trains into {output_dir}; "
                                 f"wait for it, cancel it (scancel {job_id}) or choose another output_dir")
    check_free(output_dir)
    from fatscale import resume, weights  # last, after every quicker check

    try:
        resumed = resume.check_output_dir(recipe, manifest, world_size)
        if resumed is None and recipe.model.init_from:  # a fine-tuning run starts from these weights
            weights.check_init_from(recipe)
    except (resume.ResumeMismatch, weights.SourceError) as e:
        raise PreflightError(str(e)) from None
    if resumed is None:
        return None
    _, progress = resumed
    return (f"{output_dir} holds a run at step {progress['global_step']} (epoch {progress['epoch']}): the job "
            f"resumes it and continues MLflow run {progress['mlflow_run_id']}; for a fresh run, choose another "
            f"output_dir (--set output_dir=...)")


def check_tracking(uri: str) -> str | None:
    """A warning when the tracking server does not answer (training goes on without it)."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5).close()
    except OSError as e:
        return f"MLflow tracking server {uri} does not answer ({e}); the job trains anyway and sends its metrics when it is back"
    return None


def sbatch_parameters(recipe: Recipe) -> dict:
    """submitit's Slurm parameters (sbatch names) for the recipe's slurm section."""
    s = recipe.slurm
    parameters = dict(
        job_name=recipe.tracking.run_name,
        nodes=s.nodes,
        ntasks_per_node=s.tasks_per_node or s.gpus_per_node,  # one task per GPU
        cpus_per_task=s.cpus_per_task,
        time=slurm_minutes(s.time),
        additional_parameters={"requeue": True},
        # Slurm 22.05-23.02's srun does not inherit sbatch's --cpus-per-task (every rank would get
        # one CPU); --kill-on-bad-exit ends every rank when one fails, instead of leaving the others
        # waiting in a collective until its timeout (no torchrun agent does it under Slurm).
        srun_args=[f"--cpus-per-task={s.cpus_per_task}", "--kill-on-bad-exit=1"],
    )
    if s.gpus_per_node:
        parameters.update({"gres": f"gpu:{s.gpus_per_node}"} if s.gres else {"gpus_per_node": s.gpus_per_node})
    optional = dict(partition=s.partition, account=s.account, qos=s.qos, mem=s.mem, constraint=s.constraint)
    parameters.update({k: v for k, v in optional.items() if v is not None})
    if s.exclusive:
        parameters["exclusive"] = True
    return parameters


def memory_warning(recipe: Recipe) -> str | None:
    """A GPU job without ``slurm.mem`` gets the partition's default memory, often a few GB per CPU."""
    if recipe.slurm.gpus_per_node and recipe.slurm.mem is None:
        return ("slurm.mem is not set: the job gets the partition's default memory (DefMemPerCPU/DefMemPerNode, "
                "often too little for DALI and 8 ranks); set it, e.g. --mem 0 for all of each node's memory")
    return None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        recipe = resolve_recipe(args)
        manifest = check_shards(recipe)
        parameters = sbatch_parameters(recipe)
        world_size = recipe.slurm.nodes * parameters["ntasks_per_node"]
        check_world(recipe, manifest, world_size, args.recipe)
        folder = Path(recipe.output_dir) / "slurm"
        resume_note = check_output_dir(recipe, folder, manifest, world_size)
    except (RecipeError, PreflightError, RunDirBusy) as e:
        sys.exit(f"error: {e}")
    for warning in (check_tracking(recipe.tracking.uri), memory_warning(recipe)):
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    if resume_note:
        print(f"resuming: {resume_note}")
    import submitit
    from submitit.slurm.slurm import _make_sbatch_string

    if args.dry_run:
        command = f"{sys.executable} -u -m submitit.core._submit {folder}"
        print(_make_sbatch_string(command=command, folder=folder, **parameters))
        print("# resolved recipe\n" + dump(recipe), end="")
        print("dry run: nothing submitted")
        return

    from fatscale.job import TrainJob

    folder.mkdir(parents=True, exist_ok=True)
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=recipe.slurm.max_requeues)
    executor.update_parameters(**{f"slurm_{k}": v for k, v in parameters.items()})
    job = executor.submit(TrainJob(dump(recipe), args.recipe))
    (folder / "job_id").write_text(job.job_id)
    uri = recipe.tracking.uri
    print(f"submitted job {job.job_id}: {recipe.slurm.nodes} node(s) x {parameters['ntasks_per_node']} task(s)\n"
          f"  logs:   {job.paths.stdout} (rank 0; rank R: {folder}/{job.job_id}_R_log.out and .err)\n"
          f"  follow: tail -f {job.paths.stdout}\n"
          f"  mlflow: experiment {recipe.tracking.experiment!r}, run {recipe.tracking.run_name!r} at {uri}; {browse_command(uri)}")


if __name__ == "__main__":
    main()
