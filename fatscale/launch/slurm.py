"""Submit a recipe to Slurm through submitit, or a sweep of it as one job array; jobs requeue and resume by themselves.

    python launch/slurm.py RECIPE --nodes N|MIN-MAX [--gpus-per-node G] [--tasks-per-node T]
        [--partition P] [--account A] [--qos Q] [--time D-HH:MM:SS] [--cpus-per-task C]
        [--mem M] [--constraint C] [--exclusive] [--gres] [--set key=value ...] [--dry-run]
    python launch/slurm.py RECIPE --sweep KEY=V1,V2,... [--sweep ...] | --sweep-file FILE [--max-parallel N] [...]
    python launch/slurm.py --status SWEEP_DIR

Cluster settings come from the recipe's ``slurm`` section; flags override it and are validated
with the recipe. Before anything is queued: the recipe and overrides validate, the manifest and
every shard are readable from here, the global batch of the requested nodes x tasks fits the
train split, the output directory is writable and not in use by a queued or running job or a live run,
a checkpoint there was made by a compatible recipe, and the MLflow tracking server answers (a
warning if not). With a node range MIN-MAX the job trains on the nodes Slurm gives it, at each
start and requeue, with the global batch of MAX nodes: every node count of the range is checked. Any failure is one line on stderr
and nothing is submitted. The job itself is ``fatscale.job.TrainJob``.

A sweep (fatscale/sweep.py) is checked point by point in the same way, each point a full recipe
with its own output_dir under the recipe's, and submitted as one job array of the points that
are neither finished nor queued; ``--status`` prints where each point is.
"""

import argparse
import dataclasses
import json
import os
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

# Light modules only (no torch, timm, DALI or numpy), so that --help and a bad recipe answer at once;
# fatscale.checkpoint.resume (numpy), submitit and the job are imported where they are used (BENCHMARKS.md, "Startup").
from fatscale import sweep
from fatscale.checkpoint import layout as ckpt
from fatscale.config import (Recipe, RecipeError, TrainConfig, add_recipe_arguments, dump, load_recipe,
                             slurm_minutes)
from fatscale.data.manifest import Manifest, load_manifest
from fatscale.preflight import check_world
from fatscale.run_lock import RunDirBusy, check_free
from fatscale.tracking.uri import browse_command, tracking_uri


def _node_count(text: str) -> int | str:
    return int(text) if text.isdigit() else text  # a range MIN-MAX stays text; the recipe checks it


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


# flag -> recipe key (slurm section); strings are passed as JSON so YAML keeps them strings
FLAGS = {
    "nodes": _node_count, "gpus_per_node": int, "tasks_per_node": int, "partition": str, "account": str, "qos": str,
    "time": str, "cpus_per_task": int, "mem": str, "constraint": str,
}


class PreflightError(RuntimeError):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_recipe_arguments(parser, required=False)
    for name, kind in FLAGS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, metavar=name.upper())
    parser.add_argument("--exclusive", action="store_true", default=None)
    parser.add_argument("--gres", action="store_true", default=None,
                        help="ask for GPUs as --gres=gpu:N (clusters without select/cons_tres)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the sbatch script and the resolved recipe (a sweep: its points), submit nothing")
    points = parser.add_mutually_exclusive_group()
    points.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="train the recipe at each of these values of KEY (YAML values); several --sweep: "
                             "every combination; one job array")
    points.add_argument("--sweep-file", metavar="FILE", help="train the points a YAML file lists: "
                        "[{optim.lr: 5e-4, model.name: fat_b0}, ...]; one job array")
    parser.add_argument("--max-parallel", type=_positive, metavar="N", help="a sweep's points running at once")
    parser.add_argument("--status", metavar="SWEEP_DIR", help="print each point of a sweep: its values, state, "
                        "epoch, top-1, device-hours; update its MLflow parent run")
    args = parser.parse_args(argv)
    if (args.status is None) == (args.recipe is None):
        parser.error("give a RECIPE to submit, or --status SWEEP_DIR (not both)")
    if args.max_parallel and not (args.sweep or args.sweep_file):
        parser.error("--max-parallel: only with --sweep or --sweep-file")
    return args


def resolve_recipe(args: argparse.Namespace, extra: list[str] = ()) -> Recipe:
    """The recipe with its overrides, flags and ``extra`` overrides, paths made absolute, the
    tracking URI fixed."""
    overrides = list(args.overrides)
    for name in [*FLAGS, "exclusive", "gres"]:
        value = getattr(args, name)
        if value is not None:
            overrides.append(f"slurm.{name}={json.dumps(value)}")
    recipe = load_recipe(args.recipe, [*overrides, *extra])
    # The job runs elsewhere, perhaps in another directory: pin what it must find.
    output_dir = str(Path(recipe.output_dir).resolve())
    return dataclasses.replace(
        recipe, output_dir=output_dir, train=range_global_batch(recipe, output_dir),
        data=dataclasses.replace(recipe.data, shards=str(Path(recipe.data.shards).resolve())),
        model=dataclasses.replace(recipe.model, init_from=_absolute(recipe.model.init_from)),
        tracking=dataclasses.replace(recipe.tracking, uri=tracking_uri(recipe.tracking.uri, output_dir)))


def range_global_batch(recipe: Recipe, output_dir: str) -> TrainConfig:
    """A fresh run on a node range MIN-MAX trains with the global batch of MAX nodes whatever it gets
    (``train.global_batch``; on fewer nodes gradient accumulation makes it up), so that its learning
    rate and steps do not depend on the queue. A run with checkpoints keeps theirs."""
    t, counts = recipe.train, recipe.slurm.node_counts
    if len(counts) == 1 or t.global_batch is not None or ckpt.sealed_tags(Path(output_dir) / "checkpoints"):
        return t
    tasks = recipe.slurm.tasks_per_node or recipe.slurm.gpus_per_node
    return dataclasses.replace(t, global_batch=t.batch_per_device * t.grad_accum * counts[-1] * tasks, grad_accum=1)


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


def check_output_dir_free(recipe: Recipe) -> None:
    """Writable, and no queued or running job of ours and no live run uses it."""
    output_dir = Path(recipe.output_dir)
    existing = next(p for p in (output_dir, *output_dir.parents) if p.exists())
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise PreflightError(f"output_dir: {output_dir} is not writable ({existing} is not a writable directory)")
    job_file = sweep.job_file(output_dir)
    if job_file.exists():
        job_id = job_file.read_text().strip()
        state = sweep.queued_jobs([job_id]).get(job_id)
        if state:
            raise PreflightError(f"output_dir: job {job_id} ({state}) already trains into {output_dir}; "
                                 f"wait for it, cancel it (scancel {job_id}) or choose another output_dir")
    check_free(output_dir)


def check_resume(recipe: Recipe, manifest: Manifest, world_size: int) -> dict | None:
    """The progress record of the checkpoint the job resumes on ``world_size`` ranks (None: a fresh run)."""
    from fatscale.checkpoint import resume  # last, after every quicker check

    try:
        resumed = resume.check_output_dir(recipe, manifest, world_size)
    except resume.ResumeMismatch as e:
        raise PreflightError(str(e)) from None
    return None if resumed is None else resumed[1]


def for_each_node_count(recipe: Recipe, tasks_per_node: int, check: Callable[[int], object], source: str) -> list:
    """``check(world_size)`` for every node count the job may start on (slurm.nodes N or MIN-MAX);
    one error naming the node counts it refuses."""
    counts = recipe.slurm.node_counts
    results, refused = [], {}
    for nodes in counts:
        try:
            results.append(check(nodes * tasks_per_node))
        except (RecipeError, PreflightError) as e:
            refused[nodes] = e
    if not refused:
        return results
    first = next(iter(refused.values()))
    if len(counts) == 1:
        raise first
    raise PreflightError(f"{source}: slurm.nodes {recipe.slurm.nodes}: the job cannot train on "
                         f"{', '.join(map(str, refused))} node(s) of {tasks_per_node} task(s): "
                         f"{str(first).removeprefix(f'{source}: ')}")


def preflight(recipe: Recipe, source: str) -> tuple[dict, dict | None]:
    """Every check before a submission (module docstring): the sbatch parameters, and the progress
    of the checkpoint the job resumes (None: a fresh run)."""
    manifest = check_shards(recipe)
    parameters = sbatch_parameters(recipe)
    tasks = parameters["ntasks_per_node"]
    for_each_node_count(recipe, tasks, lambda world_size: check_world(recipe, manifest, world_size, source), source)
    check_output_dir_free(recipe)
    progress = for_each_node_count(recipe, tasks, lambda world_size: check_resume(recipe, manifest, world_size),
                                   source)[-1]
    if progress is None and recipe.model.init_from:  # a fine-tuning run starts from these weights
        from fatscale import weights

        try:
            weights.check_init_from(recipe)
        except weights.SourceError as e:
            raise PreflightError(str(e)) from None
    return parameters, progress


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
    counts = s.node_counts
    parameters = dict(
        job_name=recipe.tracking.run_name,
        nodes=counts[0],  # submitit counts the job's tasks from it: an int
        ntasks_per_node=s.tasks_per_node or s.gpus_per_node,  # one task per GPU
        cpus_per_task=s.cpus_per_task,
        time=slurm_minutes(s.time),
        # sbatch's own --nodes=MIN-MAX for a range (written over the line of ``nodes``)
        additional_parameters={"requeue": True, **({"nodes": s.nodes} if len(counts) > 1 else {})},
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


def warn(recipe: Recipe) -> None:
    for warning in (check_tracking(recipe.tracking.uri), memory_warning(recipe)):
        if warning:
            print(f"warning: {warning}", file=sys.stderr)


def sbatch_script(folder: Path, parameters: dict, **array) -> str:
    """The sbatch script submitit writes (``array``: map_count and array_parallelism of a job array)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = f"{sys.executable} -u -m submitit.core._submit {folder}"
    return _make_sbatch_string(command=command, folder=folder, **parameters, **array)


def executor_for(folder: Path, recipe: Recipe, parameters: dict, **more):
    """submitit's executor for the job(s) of ``recipe`` with these sbatch ``parameters`` (``more``:
    other submitit Slurm parameters, without their slurm_ prefix)."""
    import submitit

    folder.mkdir(parents=True, exist_ok=True)
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=recipe.slurm.max_requeues)
    executor.update_parameters(**{f"slurm_{k}": v for k, v in {**parameters, **more}.items()})
    return executor


def submit_run(args: argparse.Namespace) -> None:
    recipe = resolve_recipe(args)
    parameters, progress = preflight(recipe, args.recipe)
    warn(recipe)
    output_dir = recipe.output_dir
    if progress is not None:
        print(f"resuming: {output_dir} holds a run at step {progress['global_step']} (epoch {progress['epoch']}): the "
              f"job resumes it and continues MLflow run {progress['mlflow_run_id']}; for a fresh run, choose another "
              f"output_dir (--set output_dir=...)")
    if len(recipe.slurm.node_counts) > 1 and progress is None:
        print(f"slurm.nodes {recipe.slurm.nodes}: a global batch of {recipe.train.global_batch} on any of these node "
              "counts (train.global_batch)")
    folder = Path(output_dir) / "slurm"
    if args.dry_run:
        print(sbatch_script(folder, parameters))
        print("# resolved recipe\n" + dump(recipe), end="")
        print("dry run: nothing submitted")
        return
    from fatscale.job import TrainJob

    job = executor_for(folder, recipe, parameters).submit(TrainJob(dump(recipe), args.recipe))
    sweep.job_file(output_dir).write_text(job.job_id)
    uri = recipe.tracking.uri
    print(f"submitted job {job.job_id}: {recipe.slurm.nodes} node(s) x {parameters['ntasks_per_node']} task(s)\n"
          f"  logs:   {job.paths.stdout} (rank 0; rank R: {folder}/{job.job_id}_R_log.out and .err)\n"
          f"  follow: tail -f {job.paths.stdout}\n"
          f"  mlflow: experiment {recipe.tracking.experiment!r}, run {recipe.tracking.run_name!r} at {uri}; {browse_command(uri)}")


# ---------------------------------------------------------------- sweeps


def sweep_of(args: argparse.Namespace, base: Recipe) -> sweep.Sweep:
    """The sweep the flags ask for; the one recorded in its directory when it was submitted before
    (which must be the same points)."""
    points = sweep.listed(args.sweep_file) if args.sweep_file else sweep.grid(args.sweep)
    sweep.check_names(points)
    sweep_dir = Path(base.output_dir)
    recorded = sweep.load(sweep_dir)
    if recorded is not None:
        sweep.same_points(recorded, points, sweep_dir)
        return recorded
    t = base.tracking
    return sweep.new_sweep(str(Path(args.recipe).resolve()), points, t.uri, t.experiment, t.run_name)


def point_recipe(args: argparse.Namespace, record: sweep.Sweep, sweep_dir: Path, point: sweep.Point) -> Recipe:
    """A point's full recipe: the sweep's, its values, its own output_dir, the sweep's MLflow store."""
    pinned = {"output_dir": str(record.point_dir(sweep_dir, point)), "tracking.run_name": record.point_run_name(point),
              "tracking.uri": record.uri}
    return resolve_recipe(args, [*point.overrides, *(f"{key}={json.dumps(value)}" for key, value in pinned.items())])


def plan_line(status: sweep.PointStatus, progress: dict | None) -> str:
    if status.state == sweep.FINISHED:
        return f"  {status.point.name}: finished (top-1 {status.top1:.2f}), skipped"
    if status.queued:
        return f"  {status.point.name}: job {status.job_id} {status.state}, skipped"
    if progress is None:
        return f"  {status.point.name}: submit, fresh"
    return (f"  {status.point.name}: submit, resumes step {progress['global_step']} (epoch {progress['epoch']}, "
            f"MLflow run {progress['mlflow_run_id']})")


def submit_sweep(args: argparse.Namespace) -> None:
    base = resolve_recipe(args)
    sweep_dir = Path(base.output_dir)
    record = sweep_of(args, base)
    todo, lines = [], []
    for status in sweep.point_statuses(record, sweep_dir):
        progress = None
        if status.state != sweep.FINISHED and not status.queued:
            try:
                recipe = point_recipe(args, record, sweep_dir, status.point)
                _, progress = preflight(recipe, args.recipe)
            except (RecipeError, PreflightError, RunDirBusy) as e:
                raise sweep.SweepError(f"point {status.point.name}: {e}") from None
            todo.append(recipe)
        lines.append(plan_line(status, progress))
    warn(base)
    print(f"sweep {sweep_dir}: {len(record.points)} points, {len(todo)} to submit\n" + "\n".join(lines))
    parameters = sbatch_parameters(base)  # every point's slurm section is the sweep's
    parallel = min(args.max_parallel or len(todo), max(len(todo), 1))
    if args.dry_run:
        if todo:
            print(sbatch_script(sweep_dir / "slurm", parameters, map_count=len(todo), array_parallelism=parallel))
        print("dry run: nothing submitted")
        return
    if not todo:
        print(f"nothing to submit: every point is finished or queued; python launch/slurm.py --status {sweep_dir}")
        return
    record = start_parent_run(record, sweep_dir)
    jobs = submit_array(args, base, sweep_dir, parameters, parallel, todo)
    as_what = f"job array {jobs[0].job_id.split('_')[0]}" if len(jobs) > 1 else f"job {jobs[0].job_id}"  # submitit's
    print(f"submitted {len(jobs)} point(s) as {as_what} (at most {parallel} at once)\n"
          + "".join(f"  {Path(recipe.output_dir).name}: job {job.job_id}, log {job.paths.stdout}\n"
                    for recipe, job in zip(todo, jobs))
          + f"  status: python launch/slurm.py --status {sweep_dir}\n"
          f"  mlflow: experiment {record.experiment!r}, parent run {record.run_name!r} "
          f"({record.parent_run_id or 'not created yet'}) at {record.uri}; {browse_command(record.uri)}")


def start_parent_run(record: sweep.Sweep, sweep_dir: Path) -> sweep.Sweep:
    """sweep.json, and the MLflow parent run if MLflow answers (else the first update creates it)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with sweep.locked(sweep_dir):
        record = sweep.load(sweep_dir) or record  # a point may have made the parent run since it was read
        sweep.save(sweep_dir, record)
        try:
            sweep.ensure_parent_run(record, sweep_dir)
        except Exception as e:  # MLflow away: training does not need it
            print(f"warning: MLflow at {record.uri}: the sweep's parent run is not created yet ({sweep.describe(e)}); "
                  "the first point to finish, or --status, creates it", file=sys.stderr)
    return record


def submit_array(args: argparse.Namespace, base: Recipe, sweep_dir: Path, parameters: dict, parallel: int,
                 recipes: list[Recipe]) -> list:
    from fatscale.job import TrainJob

    executor = executor_for(sweep_dir / "slurm", base, parameters, array_parallelism=parallel)
    with executor.batch():
        jobs = [executor.submit(TrainJob(dump(recipe), args.recipe, sweep_dir=str(sweep_dir))) for recipe in recipes]
    for recipe, job in zip(recipes, jobs):
        job_file = sweep.job_file(recipe.output_dir)
        job_file.parent.mkdir(parents=True, exist_ok=True)
        job_file.write_text(job.job_id)
    return jobs


def show_status(sweep_dir: Path) -> None:
    record = sweep.load(sweep_dir)
    if record is None:
        raise sweep.SweepError(f"--status {sweep_dir}: no sweep there (no {sweep.SWEEP_FILE})")
    print("\n".join(sweep.status_lines(sweep.point_statuses(record, sweep_dir))))
    warning = sweep.try_update_summary(sweep_dir)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if args.status:
            show_status(Path(args.status).resolve())
        elif args.sweep or args.sweep_file:
            submit_sweep(args)
        else:
            submit_run(args)
    except (RecipeError, PreflightError, RunDirBusy, sweep.SweepError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
