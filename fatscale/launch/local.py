"""Run a recipe on this machine: N ranks (GPUs with NCCL, or CPU processes with gloo).

    python launch/local.py RECIPE [--nproc N] [--set key=value ...]     (installed: fatscale-train ...)
    python launch/local.py --demo          # the built-in end-to-end CPU run (README's first command)

Before any process starts: the recipe and overrides validate, every rank has a batch to train, no
live run holds the output directory and a checkpoint there was made by a compatible recipe. The
ranks run ``fatscale.train`` under torchrun, which ends with this launcher, however it dies.
``--demo`` first generates the textures data set (fatscale/tryout/demo_data.py) and its shards under
outputs/demo_data, then trains recipes/demo_cpu.yaml on 2 ranks. At the end of a run it prints the
top-1 as MLflow has it, where the weights are and how to load them, and how to browse the run and
its curves.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

# Light modules only (no torch, timm or DALI): --help and a bad recipe answer at once.
from fatscale.config import RecipeError, add_recipe_arguments, load_recipe_or_exit
from fatscale.data.manifest import load_manifest
from fatscale.lifetime import end_with_parent
from fatscale.preflight import check_world
from fatscale.run_lock import RunDirBusy, check_free

# The checkout fatscale is installed from (pip install -e .) holds the recipes.
DEMO_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo_cpu.yaml"


def prepare_demo_data(shards: Path) -> None:
    if (shards / "manifest.json").exists():
        return
    from fatscale.prep import make_shards
    from fatscale.tryout.demo_data import make_demo_images

    images = make_demo_images(shards.parent / "images")
    make_shards(images, shards, samples_per_shard=200, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_recipe_arguments(parser, required=False)
    parser.add_argument("--nproc", type=int, default=None, help="ranks (default: GPUs, or 2 on a CPU machine)")
    parser.add_argument("--demo", action="store_true", help="generate the demo data and train recipes/demo_cpu.yaml")
    args = parser.parse_args()
    if args.demo == bool(args.recipe):
        parser.error("give a RECIPE or --demo")
    recipe_path = DEMO_RECIPE if args.demo else Path(args.recipe)
    if args.demo:
        prepare_demo_data(Path(load_recipe_or_exit(recipe_path, args.overrides, check_shards=False).data.shards))
    recipe = load_recipe_or_exit(recipe_path, args.overrides)
    import torch  # seconds: after the recipe's own checks

    nproc = args.nproc or (torch.cuda.device_count() or 2)
    preflight(recipe, str(recipe_path), nproc)

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "fatscale.train", str(recipe_path)]
    for override in args.overrides:
        command += ["--set", override]
    # torchrun gets SIGTERM when this process dies (even by SIGKILL): it stops the ranks, which save.
    code = subprocess.call(command, env=env, cwd=Path.cwd(), preexec_fn=end_with_parent)
    if code == 0:
        print_result(recipe)
    sys.exit(code)


def preflight(recipe, source: str, nproc: int) -> None:
    """What would make the ranks fail at once, said in one line before they start."""
    from fatscale import weights
    from fatscale.checkpoint import resume

    try:
        manifest = load_manifest(recipe.data.shards)
        check_world(recipe, manifest, nproc, source)
        check_free(recipe.output_dir)
        resumed = resume.check_output_dir(recipe, manifest, nproc)
        if resumed is None and recipe.model.init_from:
            weights.check_init_from(recipe)
    except (RecipeError, RunDirBusy, resume.ResumeMismatch, weights.SourceError) as e:
        sys.exit(f"error: {e}")
    if resumed is not None:
        _, progress = resumed
        print(f"resuming {recipe.output_dir} at step {progress['global_step']} (epoch {progress['epoch']})")


def print_result(recipe) -> None:
    """What a person acts on: the final top-1 as MLflow has it, where the weights are and how to load
    them, how to browse the run and plot its curves."""
    from fatscale.tracking.runs import latest_run
    from fatscale.tracking.uri import browse_command, run_url, tracking_uri

    uri = tracking_uri(recipe.tracking.uri, recipe.output_dir)
    run = latest_run(uri, recipe.tracking.experiment, recipe.tracking.run_name)
    run_id, metrics, latest = run.run_id, run.metrics, run.versions
    print(f"MLflow run {run_id} ({run.status}) in experiment {recipe.tracking.experiment!r}: "
          f"top1 {metrics['top1']:.2f}%, top1_ema {metrics.get('top1_ema', float('nan')):.2f}%, "
          f"best_top1 {metrics['best_top1']:.2f}%")
    folders = [folder for folder in (Path(recipe.output_dir) / "export" / name for name in ("model", "model_ema"))
               if folder.is_dir()]
    print(f"weights (timm folders): {', '.join(map(str, folders))}; checkpoints in {Path(recipe.output_dir) / 'checkpoints'}")
    print(f"  load: import fatscale, timm; timm.create_model('local-dir:{folders[-1]}', pretrained=True)")
    if latest:
        names = sorted(latest)  # the EMA's ("...-ema") last, as the folders
        print("  registered in MLflow: " + ", ".join(f"models:/{name}/{latest[name]}" for name in names)
              + f"; load: mlflow.set_tracking_uri('{uri}'); "
              f"fatscale.export.load_mlflow_model('models:/{names[-1]}/{latest[names[-1]]}')")
    where = f"{browse_command(uri)}, then open" if uri.startswith("sqlite:") else "open"
    print(f"browse the run: {where} {run_url(uri, run.experiment_id, run_id)}")
    print(f"  curves: the run's 'Model metrics' tab there, or: python -c \"from mlflow import MlflowClient; "
          f"[print(m.step, m.value) for m in MlflowClient('{uri}').get_metric_history('{run_id}', 'val/top1')]\"")


if __name__ == "__main__":
    main()
