"""What a run tells people: rank 0's log lines and its MLflow run (parameters, dataset inputs,
tags, metrics, the final models), plus the other nodes' system metrics."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fatscale.checkpoint import layout as ckpt
from fatscale.config import Recipe, flatten, to_dict
from fatscale.data.manifest import Manifest
from fatscale.export import mlflow_flavors
from fatscale.tracking.spill import SPILL_FILE
from fatscale.tracking.system import NodeMonitor, set_node_id
from fatscale.tracking.tags import GIT_COMMIT_TAG, NOTE_TAG, SOURCE_NAME_TAG, SOURCE_TYPE_TAG
from fatscale.tracking.tracker import BaseTracker, NullTracker, Tracker
from fatscale.tracking.uri import tracking_uri
from fatscale.train.distributed import node_layout
from fatscale.checkpoint.state import TrainState

log = logging.getLogger(__name__)
# Slurm kills a job 90 s after USR2: stopping (save, then requeue) must not wait on MLflow. What is
# not delivered by then is spilled to OUTPUT_DIR/mlflow-spill.jsonl for the resumed run to send.
TRACKING_STOP_TIMEOUT_S = 3.0
TRAINER_SOURCE = Path(__file__).resolve().parent / "trainer.py"  # MLflow's source of a run


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def eval_line(metrics: dict[str, float]) -> str:
    """The console's figures of an evaluation; the counts (floats, as MLflow takes them) as whole numbers."""
    figures = " ".join(f"{k}={v:.0f}" if k == "val/quarantined" else f"{k}={v:.3f}"
                       for k, v in metrics.items() if k != "val/num_images")
    return f"{figures} ({metrics['val/num_images']:.0f} images)"

class Reporter:
    """Rank 0 logs and tracks; every rank calls every method (the others do nothing, except a
    multi-node run's node leaders, which send their node's system metrics)."""

    def __init__(self, recipe: Recipe, manifest: Manifest, state: TrainState, rank: int, local_rank: int, world: int,
                 device: torch.device):
        self.recipe, self.manifest, self.rank, self.world = recipe, manifest, rank, world
        self.num_classes = recipe.model.num_classes or manifest.num_classes
        self.on_gpu = device.type == "cuda"
        self.data_name = Path(recipe.data.shards).resolve().name
        self.devices = (f"{world} GPU{'s' * (world > 1)}" if self.on_gpu else
                        f"{world} CPU rank{'s' * (world > 1)}")
        node_index, hosts = node_layout(local_rank)
        system_metrics = recipe.tracking.system_metrics
        if system_metrics and len(hosts) > 1 and node_index is not None:  # the node of each series' name
            set_node_id(f"node{node_index}")
        uri = tracking_uri(recipe.tracking.uri, recipe.output_dir)
        self.tracker: BaseTracker = NullTracker()
        if rank == 0:
            tags = {"model": recipe.model.name, "recipe": recipe.tracking.run_name, "nodes": str(len(hosts)),
                    "job_id": os.environ.get("SLURM_JOB_ID", "local"), SOURCE_NAME_TAG: str(TRAINER_SOURCE),
                    SOURCE_TYPE_TAG: "JOB" if "SLURM_JOB_ID" in os.environ else "LOCAL", GIT_COMMIT_TAG: git_commit()}
            if len(hosts) > 1:  # which machine each node's system metrics (system/nodeN/...) come from
                tags["node_hosts"] = " ".join(f"node{i}={host}" for i, host in enumerate(hosts))
            self.tracker = Tracker(uri, recipe.tracking.experiment, recipe.tracking.run_name, state.mlflow_run_id, tags,
                                   system_metrics, spill_path=Path(recipe.output_dir) / SPILL_FILE)
        self.node_monitor = None
        if system_metrics and len(hosts) > 1:  # rank 0's Tracker monitors its node; the other nodes log into its run
            run_id = [self.tracker.run_id]
            dist.broadcast_object_list(run_id, src=0)
            if run_id[0] is None and rank == 0:
                log.warning("MLflow unreachable at the start: the other %d node(s) log no system metrics in this "
                            "session", len(hosts) - 1)
            elif run_id[0] is not None and node_index not in (None, 0):
                self.node_monitor = NodeMonitor(uri, run_id[0])
        self.window = dict(images=0, wait=0.0, start=time.monotonic())  # since the last log line

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id

    def started(self, state: TrainState, recipe_text: str, changed: list[str], global_batch: int,
                initialised_from=None) -> None:
        """A new run's parameters, datasets, description, recipe and, when fine-tuning, where its
        weights come from (``initialised_from``, fatscale.weights.Weights); a resumed one's marks.
        The world size is a metric, logged at each session's first step: a resumed run may have
        another (params cannot change)."""
        if self.rank != 0:
            return
        r, output_dir = self.recipe, Path(self.recipe.output_dir)
        self.tracker.log({"world_size": self.world, "gpus": self.world if self.on_gpu else 0},
                                 state.global_step)
        if state.mlflow_run_id is None:
            params = flatten(to_dict(r))
            params.update(global_batch=global_batch)
            self.tracker.log_params(params)
            self.tracker.log_manifest(self.manifest, r.data.shards)
            splits = self.manifest.splits
            self.tracker.set_tags({NOTE_TAG: (
                f"{r.model.name} on {self.data_name} ({splits['train'].num_samples} train, "
                f"{splits['val'].num_samples} val images, {self.manifest.num_classes} classes), "
                f"{r.train.epochs} epochs on {self.devices}: training")})
            if initialised_from is not None:  # lineage: the weights, and the run that made them
                self.tracker.set_tags({"init_from": r.model.init_from, "init_from_weights": initialised_from.description,
                                       **({"init_from_run_id": initialised_from.run_id} if initialised_from.run_id else {})})
            resolved = output_dir / "recipe.yaml"
            resolved.write_text(recipe_text)
            self.tracker.log_artifact(str(resolved))
        else:
            self.tracker.set_tags({"resumed_at_step": str(state.global_step)})
        if changed:  # MLflow params cannot change: the new recipe is an artifact, the step a tag
            step = state.global_step
            log.info("resumed at step %d with a changed recipe: %s", step, ", ".join(changed))
            changed_recipe = output_dir / f"recipe-{ckpt.tag_for(step)}.yaml"
            changed_recipe.write_text(recipe_text)
            self.tracker.log_artifact(str(changed_recipe))
            self.tracker.set_tags({"recipe_changed_at_step": str(step), "recipe_changes": ", ".join(changed)})

    def waited(self, seconds: float, images: int) -> None:
        """A batch of ``images`` (over all ranks) that took ``seconds`` to come from the loader."""
        self.window["wait"] += seconds
        self.window["images"] += images

    def step(self, state: TrainState, total_steps: int, loss: float, lr: float, grad_norm: float, eta_s: float,
             img_size: int, compiled_graphs: int | None) -> None:
        """The log line and metrics of step ``state.global_step`` (rank 0, every ``log_every``)."""
        elapsed = time.monotonic() - self.window["start"]
        rate, wait = self.window["images"] / elapsed, self.window["wait"] / elapsed
        compiled = f" compiled_graphs {compiled_graphs}" if compiled_graphs is not None else ""
        log.info("epoch %d step %d/%d loss %.4f lr %.3g grad_norm %.3f %.0f img/s data_wait %.0f%% %d px%s eta %s",
                 state.epoch, state.global_step, total_steps, loss, lr, grad_norm, rate, 100 * wait, img_size,
                 compiled, time.strftime("%H:%M:%S", time.gmtime(eta_s)))
        metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm, "train/images_per_s": rate,
                   "train/data_wait": wait, "train/img_size": img_size}
        if compiled_graphs is not None:
            metrics["train/compiled_graphs"] = compiled_graphs
        self.tracker.log(metrics, state.global_step)
        self.window = dict(images=0, wait=0.0, start=time.monotonic())

    def evaluated(self, state: TrainState, metrics: dict[str, float]) -> None:
        self.tracker.log(metrics, state.global_step)
        if self.rank == 0:
            log.info("eval epoch %d: %s", state.epoch, eval_line(metrics))

    def interrupted(self, state: TrainState, saved: Path) -> None:
        if self.rank == 0:
            log.warning("stop requested: saved %s; training stops here", saved)
        self.tracker.set_tags({"interrupted_at_step": str(state.global_step)})
        self._end("KILLED", TRACKING_STOP_TIMEOUT_S)

    def failed(self) -> None:
        self._end("FAILED", TRACKING_STOP_TIMEOUT_S)  # a no-op after interrupted(): the run stays KILLED

    def finished(self, state: TrainState, summary: dict[str, float], metrics: dict[str, float],
                 exported: list[Path], images_per_s: float | None) -> None:
        """The summary metrics, the exported weights as registered models, the description with the
        result, the log; then the run is FINISHED."""
        if self.node_monitor is not None:
            self.node_monitor.finish(TRACKING_STOP_TIMEOUT_S)
        if self.rank != 0:
            return
        r, step, tracker = self.recipe, state.global_step, self.tracker
        tracker.log({key: value for key, value in summary.items() if key == "best_top1" or key.endswith("px")}, step)
        val = f"{self.data_name}/val ({metrics['val/num_images']:.0f} images)"
        for folder, key, which in zip(exported, ("top1", "top1_ema"), ("raw", "EMA")):
            name = f"{r.tracking.run_name}-{r.model.name}" + ("-ema" if key == "top1_ema" else "")
            tracker.log_model(name, folder, mlflow_flavors(r.model.name), {key: summary[key]}, step,
                              params={"model": r.model.name, "weights": which, "num_classes": self.num_classes,
                                      "img_size": r.data.img_size},
                              registered_name=name,
                              description=f"{r.model.name}, {which} weights at step {step}: top-1 {summary[key]:.2f}% on {val}")
        throughput = f", {images_per_s:.0f} images/s" if images_per_s is not None else ""
        by_size = ""
        if len(r.data.val_sizes) > 1:  # the trainer's summary then has the top-1 at each size
            sizes = {size: summary[f"top1_{size}px"] for size in r.data.val_sizes}
            best = max(sizes, key=sizes.get)
            tracker.set_tags({"best_eval_size": str(best)})
            by_size = " Top-1 by eval size: " + ", ".join(f"{s} px {v:.2f}%" for s, v in sizes.items()) + \
                f" (best: {best} px)."
            log.info("best eval size: %d px (top-1 %.2f%%)", best, sizes[best])
        ema_text = (f" (EMA {summary['top1_ema']:.2f}%, best {summary['best_top1']:.2f}%)" if "top1_ema" in summary else
                    f" (best {summary['best_top1']:.2f}%)")
        tracker.set_tags({NOTE_TAG: (
            f"**top-1 {summary['top1']:.2f}%**{ema_text} on {val}: {r.model.name} trained on {self.data_name}/train "
            f"({self.manifest.splits['train'].num_samples} images, {self.manifest.num_classes} classes) for "
            f"{state.epoch} epochs ({step} steps){throughput}, {state.device_s / 3600:.3f} device-hours "
            f"on {self.devices}.{by_size}")})
        log_file = Path(r.output_dir) / "train.log"
        if log_file.exists():
            tracker.log_artifact(str(log_file))
        tracker.close("FINISHED")
        log.info("done: %s", " ".join(f"{k}={v:.2f}" for k, v in summary.items()))

    def _end(self, status: str, timeout: float) -> None:
        if self.node_monitor is not None:
            self.node_monitor.finish(timeout)
        self.tracker.close(status, timeout=timeout)
