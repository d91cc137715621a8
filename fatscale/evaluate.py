"""Evaluate trained weights on a split of the shards: training's DALI val pipeline and evaluation
loop, top-1/top-5 per model and size, per-class accuracy and confusion matrices.

    python -m fatscale.evaluate SOURCE --shards DIR [--split val] [--sizes 224 256] [--crop-pct 0.875]
                                [--batch N] [--precision fp32] [--model NAME] [--out DIR] [--json] [--log-to-run]
    torchrun --nproc-per-node=8 -m fatscale.evaluate SOURCE --shards DIR          # one rank per GPU

SOURCE (fatscale.weights; nothing is unpickled as code): a run's output directory (its newest
intact checkpoint), a checkpoint directory, an exported timm folder, a ``.safetensors`` or
state-dict file (``--model`` names its architecture) or ``models:/NAME/VERSION``. A run or a
checkpoint gives its raw and EMA weights, ``model`` and ``model_ema`` as training names them.
Defaults come from the source, so that a run's final weights score exactly what the run logged:
its recipe's sizes (``data.img_size``, then ``data.eval_sizes``), crop, val batch per rank and
precision (the same pipeline and the same batches: a batch's shape may change a kernel, so the
logits' last bits); else a timm folder's input size and crop; else 224 px at 0.875, batch 100, fp32.

Prints a table (model, size, top-1, top-5, images), or with ``--json`` the list of
``{"model", "size", "top1", "top5", "images"}``. Writes ``results.json`` (that list and how it was
made), ``per_class_<model>_<size>px.csv`` and, up to 100 classes, ``confusion_<model>_<size>px.png``
to ``--out`` (default ``OUTPUT_DIR/evaluation`` for an output directory, else ``./evaluation``;
another split than val adds ``/<split>``). ``--log-to-run`` adds the figures to the source's
MLflow run at its last step under training's keys (``val/top1_224px``, ``val/top1_ema_224px``,
top5 and loss alike, and ``val/top1``, ``val/top1_ema`` at the recipe's size; another crop than
the source's adds ``_crop<pct>``, another split logs ``<split>_eval/...``) and the files as
artifacts under ``evaluation/`` (``evaluation/<split>``); the run's status stays what it is.

A bad SOURCE or flag is one line, ``error: ...``, exit 2, before any pipeline is built. torch,
timm, DALI and MLflow are imported where used, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from fatscale.atomic import write_atomic
from fatscale.data.config import MIN_IMG_SIZE
from fatscale.tracking import runs

if TYPE_CHECKING:
    import torch

    from fatscale.data.config import DataConfig
    from fatscale.data.manifest import Manifest
    from fatscale.weights import Weights

PROG = "python -m fatscale.evaluate"
DEFAULT_BATCH, DEFAULT_PRECISION = 100, "fp32"
MAX_PICTURE_CLASSES = 100  # a larger confusion matrix is unreadable as a picture: the CSV has it


class UsageError(ValueError):
    """A SOURCE, flag or destination that cannot be evaluated (one line)."""


@dataclass(frozen=True)
class Result:
    model: str  # "model" or "model_ema"
    size: int
    top1: float
    top5: float
    loss: float
    images: int
    confusion: torch.Tensor  # [true class, top-1 prediction] -> images, int64 on the CPU

    def summary(self) -> dict:
        return dict(model=self.model, size=self.size, top1=self.top1, top5=self.top5, images=self.images)


@dataclass(frozen=True)
class RunTarget:
    """Where --log-to-run writes: an MLflow run and the step its figures go to."""

    tracking_uri: str
    run_id: str
    step: int


@dataclass(frozen=True)
class Plan:
    """Everything an evaluation needs, checked before any pipeline is built."""

    source: str
    weights: list[Weights]
    models: list[torch.nn.Module]
    manifest: Manifest
    split: str
    data: DataConfig  # at sizes[0]; the crop and the source's loader settings
    sizes: list[int]
    batch: int
    precision: str
    variant: str  # "" or "_crop<pct>" when the crop is not the source's: in file names and metric keys
    home_size: int  # the source's own eval size: its val/top1
    out: Path
    runs: list[RunTarget | None]  # per weights, with --log-to-run


# ------------------------------------------------------------------ command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, as every other refusal
        self.exit(2, f"error: {message}\n")


# Named for argparse's "invalid <name> value: ..." on text that is no number.
def pixels(text: str) -> int:
    size = int(text)
    if size < MIN_IMG_SIZE:
        raise argparse.ArgumentTypeError(f"{size}: sizes start at {MIN_IMG_SIZE} px")
    return size


def fraction(text: str) -> float:
    crop = float(text)
    if not 0 < crop <= 1:
        raise argparse.ArgumentTypeError(f"{crop}: must be in (0, 1]")
    return crop


def count(text: str) -> int:
    batch = int(text)
    if batch < 1:
        raise argparse.ArgumentTypeError(f"{batch}: must be at least 1")
    return batch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0].replace("\n", " "),
                     epilog="Under torchrun every rank evaluates its part of the split (one GPU each); rank 0 "
                            "prints and writes. See the module's docstring (fatscale/evaluate.py) for the details.")
    parser.add_argument("source", metavar="SOURCE",
                        help="a run's output directory, a checkpoint directory, an exported timm folder, a "
                             ".safetensors or state-dict file, or models:/NAME/VERSION")
    parser.add_argument("--shards", required=True, type=Path, metavar="DIR", help="the shard directory (manifest.json)")
    parser.add_argument("--split", default="val", help="the split to evaluate (default: val; train: centre crops of "
                                                       "the train images)")
    parser.add_argument("--sizes", nargs="+", type=pixels, metavar="PX",
                        help="eval sizes (default: the recipe's img_size and eval_sizes, else the model's input size)")
    parser.add_argument("--crop-pct", type=fraction, metavar="F",
                        help="centre crop fraction (default: the recipe's, else the model's, else 0.875)")
    parser.add_argument("--batch", type=count, metavar="N", help="images per batch and rank (default: the "
                                                                  f"recipe's val batch, else {DEFAULT_BATCH})")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                        help=f"autocast as in training (default: the recipe's, else {DEFAULT_PRECISION})")
    parser.add_argument("--model", metavar="NAME", help="the architecture (fat_b0, ...): required for a bare weights "
                                                        "file, checked against what other sources name")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="where the files go (default: OUTPUT_DIR/evaluation for an output directory, else "
                             "./evaluation; another split than val: DIR/SPLIT)")
    parser.add_argument("--json", action="store_true", help="print the results as a JSON list instead of a table")
    parser.add_argument("--log-to-run", action="store_true",
                        help="log the figures and files into the MLflow run that made the weights")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from fatscale.config import RecipeError
    from fatscale.data.manifest import ManifestError
    from fatscale.weights import SourceError

    try:
        plan = make_plan(args)
    except (UsageError, SourceError, ManifestError, RecipeError) as e:
        if int(os.environ.get("RANK", "0")) == 0:  # the same on every rank: said once
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    import torch.distributed as dist

    rank, world, device = init_group()
    try:
        results = evaluate_all(plan, rank, world, device)
        if rank == 0:
            report(plan, results, args.json, world, device)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ the plan: every check first


def make_plan(args: argparse.Namespace) -> Plan:
    from fatscale.config import resolve
    from fatscale.data.config import DataConfig
    from fatscale.data.manifest import load_manifest
    from fatscale.weights import build_model, weights_to_evaluate

    weights = weights_to_evaluate(args.source)
    manifest = load_manifest(args.shards)
    if args.split not in manifest.splits:
        raise UsageError(f"--split {args.split}: {args.shards} has the splits {', '.join(manifest.splits)}")
    models = [build_model(w, args.model) for w in weights]
    if models[0].num_classes != manifest.num_classes:
        raise UsageError(f"{weights[0].description} classifies {models[0].num_classes} classes, {args.shards} has "
                         f"{manifest.num_classes}")
    recipe = resolve(weights[0].recipe, weights[0].description) if weights[0].recipe else None
    timm_cfg = models[0].pretrained_cfg  # a timm folder's input size and crop, else the architecture's
    home_sizes = list(recipe.data.val_sizes) if recipe else [timm_cfg["input_size"][-1]]
    home_crop = recipe.data.crop_pct if recipe else timm_cfg["crop_pct"]
    sizes, crop = args.sizes or home_sizes, args.crop_pct or home_crop
    # The recipe's loader settings (threads, decode device, channels_last) with this evaluation's shards and crop.
    data = replace(recipe.data if recipe else DataConfig(shards=str(args.shards)), shards=str(args.shards),
                   img_size=sizes[0], crop_pct=crop, eval_sizes=())
    out = args.out or (Path(args.source) / "evaluation" if (Path(args.source) / "checkpoints").is_dir()
                       else Path("evaluation"))
    return Plan(source=args.source, weights=weights, models=models, manifest=manifest, split=args.split, data=data,
                sizes=sizes, batch=args.batch or (recipe.train.val_batch_per_device if recipe else DEFAULT_BATCH),
                precision=args.precision or (recipe.train.precision if recipe else DEFAULT_PRECISION),
                variant="" if crop == home_crop else f"_crop{crop:g}", home_size=home_sizes[0],
                out=out if args.split == "val" else out / args.split,
                runs=[run_target(w, args.source) for w in weights] if args.log_to_run else [None] * len(weights))


def run_target(weights: Weights, source: str) -> RunTarget:
    """The MLflow run that made ``weights`` and its last step (that of its last ``val/top1``)."""
    if weights.run_id is None or weights.tracking_uri is None:
        raise UsageError(f"--log-to-run: {source} names no MLflow run (a run's output directory, a checkpoint or a "
                         f"models:/ URI does)")
    try:
        step = runs.last_step(weights.tracking_uri, weights.run_id, "val/top1")
    except runs.MlflowError as e:
        raise UsageError(f"--log-to-run: MLflow run {weights.run_id} at {weights.tracking_uri}: {e}") from None
    return RunTarget(weights.tracking_uri, weights.run_id, step)


# ------------------------------------------------------------------ evaluating


def init_group() -> tuple[int, int, torch.device]:
    """rank, world size and device: torchrun's process group (NCCL on GPUs, gloo otherwise), else a
    group of this one process (no port), for evaluate()'s all_reduce."""
    import torch
    import torch.distributed as dist

    from fatscale.train.distributed import cuda_device_index

    device = torch.device("cpu")
    if torch.cuda.is_available():
        visible = torch.cuda.device_count()
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", visible))
        device = torch.device("cuda", cuda_device_index(int(os.environ.get("LOCAL_RANK", "0")), local_world, visible))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ:  # torchrun's variables
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), device


def evaluate_all(plan: Plan, rank: int, world: int, device: torch.device) -> list[Result]:
    """Every model at every size, in training's order (per size: raw, then EMA)."""
    import torch

    from fatscale.data.loader import ValLoader
    from fatscale.train.evaluation import evaluate

    classes = plan.manifest.num_classes
    models = [model.to(device) for model in plan.models]
    results = []
    for size in plan.sizes:
        loader = ValLoader(plan.manifest, plan.data, plan.batch, rank, world, device, img_size=size, split=plan.split)
        for weights, model in zip(plan.weights, models):
            confusion = torch.zeros(classes, classes, dtype=torch.int64, device=device)
            totals = evaluate(model, loader, device, plan.precision, confusion=confusion)
            results.append(Result(weights.label, size, totals["top1"], totals["top5"], totals["loss"],
                                  int(totals["count"]), confusion.cpu()))
    return results


# ------------------------------------------------------------------ what comes out


def report(plan: Plan, results: list[Result], as_json: bool, world: int, device: torch.device) -> None:
    """Rank 0: the files, the MLflow records, the printout."""
    files = write_files(plan, results, world, device)
    by_run: dict[RunTarget, list[Result]] = {}  # raw and EMA share their run
    for weights, target in zip(plan.weights, plan.runs):
        if target is not None:
            by_run.setdefault(target, []).extend(r for r in results if r.model == weights.label)
    logged = [log_to_run(plan, target, run_results, files) for target, run_results in by_run.items()]
    if as_json:
        print(json.dumps([r.summary() for r in results]))
    else:
        info = plan.manifest.splits[plan.split]
        print(f"{plan.source} on {plan.data.shards} {plan.split} ({info.num_samples} images), crop "
              f"{plan.data.crop_pct:g}, batch {plan.batch}, {plan.precision}, {ranks_text(world, device)}")
        print(table(results))
        print(f"files: {plan.out}/ (results.json, per-class accuracy CSVs, confusion pictures)")
    for line in logged:
        print(line, file=sys.stderr if as_json else sys.stdout)  # stdout stays JSON


def ranks_text(world: int, device: torch.device) -> str:
    kind = "GPU" if device.type == "cuda" else "CPU rank"
    return f"{world} {kind}{'s' * (world > 1)}"


def table(results: list[Result]) -> str:
    rows = [("model", "size", "top-1", "top-5", "images")]
    rows += [(r.model, f"{r.size}", f"{r.top1:.2f}", f"{r.top5:.2f}", f"{r.images}") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    aligned = [[row[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:]))] for row in rows]
    return "\n".join("  ".join(row) for row in aligned)


def write_files(plan: Plan, results: list[Result], world: int, device: torch.device) -> list[Path]:
    """results.json, and per result its per-class CSV and (up to MAX_PICTURE_CLASSES) its confusion picture."""
    plan.out.mkdir(parents=True, exist_ok=True)
    summary = dict(source=plan.source, weights=[w.description for w in plan.weights],
                   shards=str(Path(plan.data.shards).resolve()), split=plan.split, crop_pct=plan.data.crop_pct,
                   batch=plan.batch, precision=plan.precision, ranks=ranks_text(world, device),
                   results=[r.summary() for r in results])
    files = [plan.out / "results.json"]
    write_atomic(files[0], (json.dumps(summary, indent=2) + "\n").encode())
    for r in results:
        stem = f"{r.model}_{r.size}px{plan.variant}"
        files.append(plan.out / f"per_class_{stem}.csv")
        write_atomic(files[-1], per_class_csv(r, plan.manifest).encode())
        if plan.manifest.num_classes <= MAX_PICTURE_CLASSES:
            files.append(plan.out / f"confusion_{stem}.png")
            write_atomic(files[-1], confusion_png(r, plan.manifest, f"{plan.split}{plan.variant}"))
    return files


def per_class_csv(result: Result, manifest: Manifest) -> str:
    """One row per class: its images, how many the top-1 got right, and what it is most often taken for."""
    confusion = result.confusion
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["index", "class", "name", "images", "top1_correct", "top1_accuracy", "most_confused_with",
                     "times"])
    for i, (cls, name) in enumerate(zip(manifest.classes, manifest.class_names)):
        images, correct = int(confusion[i].sum()), int(confusion[i, i])
        wrong = confusion[i].clone()
        wrong[i] = 0
        other = int(wrong.argmax())
        taken_for = [manifest.class_names[other], int(wrong[other])] if wrong[other] else ["", 0]
        writer.writerow([i, cls, name, images, correct, f"{100 * correct / images:.2f}" if images else "", *taken_for])
    return text.getvalue()


def confusion_png(result: Result, manifest: Manifest, what: str) -> bytes:
    """The confusion matrix as a picture: each true class's row shows where its images went."""
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    counts = result.confusion.double()
    shares = counts / counts.sum(1, keepdim=True).clamp(min=1)
    n = len(manifest.classes)
    inches = min(4 + 0.14 * n, 18)
    font = max(3.0, min(8.0, 300 / n))
    names = [name.split(",")[0] for name in manifest.class_names]  # ImageNet's "tench, Tinca tinca": its first
    figure, axes = plt.subplots(figsize=(inches + 1.5, inches), dpi=150)
    image = axes.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(n), names, rotation=90, fontsize=font)
    axes.set_yticks(range(n), names, fontsize=font)
    axes.set_xlabel("predicted (top-1)")
    axes.set_ylabel("true class")
    if n <= 20:  # room for the counts
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    axes.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=font,
                              color="white" if shares[i, j] > 0.5 else "black")
    axes.set_title(f"{result.model} at {result.size} px, {what}: top-1 {result.top1:.2f}% ({result.images} images)",
                   fontsize=9)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png")
    plt.close(figure)
    return png.getvalue()


def metric_keys(plan: Plan, result: Result) -> dict[str, float]:
    """Training's keys (fatscale.train.trainer.evaluate): val/top1_224px, val/top1_ema_224px, ...,
    and val/top1, val/top1_ema at the source's own size and crop."""
    prefix = "val" if plan.split == "val" else f"{plan.split}_eval"
    suffix = result.model.removeprefix("model")  # "" or "_ema"
    values = dict(top1=result.top1, top5=result.top5, loss=result.loss)
    metrics = {f"{prefix}/{key}{suffix}_{result.size}px{plan.variant}": value for key, value in values.items()}
    if plan.split == "val" and not plan.variant and result.size == plan.home_size:
        metrics.update({f"val/{key}{suffix}": value for key, value in values.items()})
    return metrics


def log_to_run(plan: Plan, target: RunTarget, results: list[Result], files: list[Path]) -> str:
    """The figures at the run's last step and the files under ``evaluation/`` (the run keeps its
    status and end time)."""
    metrics = {key: value for r in results for key, value in metric_keys(plan, r).items()}
    artifact_path = "evaluation" if plan.split == "val" else f"evaluation/{plan.split}"
    runs.add_to_run(target.tracking_uri, target.run_id, metrics, target.step, files, artifact_path)
    return f"logged to MLflow run {target.run_id} at step {target.step} ({target.tracking_uri}): {len(metrics)} metrics"


if __name__ == "__main__":
    main()
