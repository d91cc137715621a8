"""The training loop: one recipe, any number of ranks (CPU with gloo, GPUs with NCCL).

    torchrun --nproc-per-node N -m fatscale.train RECIPE [--set key=value ...]
    (or launch/local.py, launch/slurm.py, which set the distributed environment)

Top to bottom: distributed setup -> recipe components (data, model, optimizer, scheduler, loss,
EMA, tracker) -> resume from the latest checkpoint in output_dir, if any -> epochs of DeepSpeed
steps with periodic logging and checkpoints -> evaluation of the raw and EMA model -> export.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import logging.handlers
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

import fatscale  # noqa: F401  (registers the FAT models with timm)
import deepspeed
import timm
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from fatscale import checkpoint as ckpt
from fatscale import resume
from fatscale.config import (Recipe, RecipeError, add_recipe_arguments, check_world, dump, flatten, load_recipe_or_exit,
                             to_dict)
from fatscale.data.loader import LoaderState, TrainLoader, ValLoader
from fatscale.data.manifest import load_manifest
from fatscale.export import export, mlflow_flavors
from fatscale.lifetime import end_with_parent
from fatscale.run_lock import RunDirBusy, RunLock
from fatscale.tracking import (GIT_COMMIT_TAG, NOTE_TAG, SOURCE_NAME_TAG, SOURCE_TYPE_TAG, SPILL_FILE, NodeMonitor,
                               NullTracker, Tracker, tracking_uri)
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3

log = logging.getLogger("fatscale")
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
# Rank 0's records from before it holds output_dir (DeepSpeed's compiler probes among them), for train.log.
_early_records: logging.handlers.MemoryHandler | None = None
# Slurm kills a job 90 s after USR2: stopping (save, then requeue) must not wait on MLflow. What is
# not delivered by then is spilled to OUTPUT_DIR/mlflow-spill.jsonl for the resumed run to send.
TRACKING_STOP_TIMEOUT_S = 3.0


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite outside fp16 loss scaling."""


class Interrupted(Exception):
    """Training stopped on request (preemption, time limit, SIGTERM) after saving a checkpoint."""

    def __init__(self, step: int):
        super().__init__(f"interrupted at step {step}, checkpoint saved")
        self.step = step


# ---------------------------------------------------------------- distributed environment


def init_distributed() -> tuple[int, int, int, torch.device]:
    """rank, world size, local rank and device from the launcher's environment variables."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RuntimeError(f"environment variable {key} is not set: start through torchrun or launch/*.py")
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # DeepSpeed prints what it builds: for the log, not the console
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    for line in printed.getvalue().splitlines():
        logging.getLogger("deepspeed").info("%s", line)
    return rank, world, local_rank, device


def node_layout(local_rank: int) -> tuple[int | None, list[str]]:
    """This rank's node index if it is its node's local rank 0 (else None), and the host of every
    node, in the order of the nodes' first ranks; from the ranks themselves, whatever the launcher."""
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, (local_rank, socket.gethostname()))
    leaders = [rank for rank, (local, _) in enumerate(ranks) if local == 0]
    index = leaders.index(dist.get_rank()) if local_rank == 0 else None
    return index, [ranks[rank][1] for rank in leaders]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """This rank's host RNG states, as JSON (Mixup draws from NumPy, random erasing from Python
    and torch, drop path from torch)."""
    np_state = np.random.get_state()
    return dict(
        python=[list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
        numpy=[np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        torch=torch.get_rng_state().tolist(),
        cuda=[s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    )


def set_rng_state(state: dict) -> None:
    internal, version, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    for i, s in enumerate(state["cuda"]):
        torch.cuda.set_rng_state(torch.tensor(s, dtype=torch.uint8), i)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


# ---------------------------------------------------------------- components

# Plain data classes in DeepSpeed's ZeRO optimizer states. The weights-only unpickler rebuilds
# them by setting attributes; it calls no code named in the file.
DEEPSPEED_STATE_CLASSES = [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch engine, loading with ``weights_only=True`` (no code from the file runs)."""

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(DEEPSPEED_STATE_CLASSES):
            return torch.load(path, map_location=map_location, weights_only=True)




def deepspeed_config(recipe: Recipe, world: int) -> dict:
    t = recipe.train
    config = {
        "train_micro_batch_size_per_gpu": t.batch_per_device,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_per_device * t.grad_accum * world,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "steps_per_print": 10**9,  # fatscale logs
        "wall_clock_breakdown": False,
    }
    if t.precision != "fp32":
        # Autocast keeps fp32 master weights in the module (BatchNorm and EMA stay fp32);
        # fp16 adds dynamic loss scaling, which skips steps with inf/NaN gradients.
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if t.precision == "bf16" else "float16"}
    return config


def fp16_grad_scaler(engine) -> torch.amp.GradScaler | None:
    """The torch GradScaler DeepSpeed runs for fp16 autocast (in the engine without ZeRO, in the ZeRO
    optimizer with it). DeepSpeed does not checkpoint it, so fatscale does, for an exact resume."""
    return engine.torch_autocast_z0_gradscaler or getattr(engine.optimizer, "torch_autocast_gradscaler", None)


def build_model(recipe: Recipe, num_classes: int, world: int, device: torch.device) -> torch.nn.Module:
    m = recipe.model
    kwargs = dict(num_classes=num_classes, bidirectional=m.bidirectional)
    if m.drop_path is not None:
        kwargs["drop_path_rate"] = m.drop_path
    model = timm.create_model(m.name, **kwargs)
    if m.grad_checkpointing:
        model.set_grad_checkpointing(stages=list(m.grad_checkpointing))
    if world > 1 and recipe.train.sync_bn and device.type == "cuda":  # torch's SyncBatchNorm runs on GPUs only
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # Parameters stay contiguous (DeepSpeed broadcasts and flattens them as such); channels_last
    # inputs from the loader make convolutions run channels_last.
    return model


def build_loss(recipe: Recipe) -> torch.nn.Module:
    a = recipe.aug
    if a.mixup > 0 or a.cutmix > 0:
        return SoftTargetCrossEntropy()  # the loader's Mixup already smoothed the targets
    if a.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=a.label_smoothing)
    return torch.nn.CrossEntropyLoss()


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: ValLoader, device: torch.device, precision: str) -> dict[str, float]:
    """top-1/top-5 (percent) and loss over every val sample once, summed over ranks, with the
    number of images evaluated and of those left out as undecodable (quarantined)."""
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64, device=device)  # loss sum, top1, top5, count, quarantined
    autocast = precision != "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    for images, labels in loader:
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            logits = model(images)
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        totals[0] += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").double()
        totals[1] += (top5[:, 0] == labels).sum()
        totals[2] += (top5 == labels[:, None]).any(1).sum()
        totals[3] += labels.numel()
    totals[4] = len(loader.quarantine)
    dist.all_reduce(totals)
    loss_sum, top1, top5, count, quarantined = totals.tolist()
    return dict(loss=loss_sum / count, top1=100 * top1 / count, top5=100 * top5 / count, count=count,
                quarantined=quarantined)


def hold_output_dir(output_dir: Path, rank: int) -> RunLock | None:
    """Rank 0 locks ``output_dir`` for this run (fatscale.run_lock) and logs into it from then on;
    every rank raises :class:`RunDirBusy` when another live run holds it."""
    lock = RunLock(output_dir) if rank == 0 else None
    refusal = [None]
    if lock is not None:
        try:
            lock.acquire()
        except RunDirBusy as e:
            refusal[0] = str(e)
    dist.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise RunDirBusy(refusal[0])
    if rank == 0:
        handler = logging.FileHandler(output_dir / "train.log")
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root = logging.getLogger()
        root.addHandler(handler)
        if _early_records is not None:
            _early_records.setTarget(handler)
            _early_records.flush()
            root.removeHandler(_early_records)
    return lock


def recipe_changes(old_text: str, new_text: str) -> list[str]:
    """The recipe keys whose values differ between two resolved recipes."""
    old, new = flatten(yaml.safe_load(old_text)), flatten(yaml.safe_load(new_text))
    return sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))


# ---------------------------------------------------------------- the run


def train(recipe: Recipe, recipe_text: str, stop: threading.Event | None = None) -> dict[str, float]:
    """Train ``recipe`` on this rank; returns the final top-1 summary. Setting ``stop`` (from a
    signal handler, say) on any rank makes every rank save a checkpoint at the next step and
    raise :class:`Interrupted`."""
    rank, world, local_rank, device = init_distributed()
    t = recipe.train
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
    output_dir = Path(recipe.output_dir)
    run_lock = hold_output_dir(output_dir, rank)
    checkpoint_dir = output_dir / "checkpoints"
    if rank == 0:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    manifest = load_manifest(recipe.data.shards)
    num_classes = recipe.model.num_classes or manifest.num_classes
    # Before any state is built: a checkpoint made by an incompatible recipe is refused.
    resumed = resume.check_output_dir(recipe, manifest, world)
    seed_everything(recipe.seed)  # identical initial weights on every rank
    model = build_model(recipe, num_classes, world, device).to(device)
    if world > 1 and t.sync_bn and device.type != "cuda" and rank == 0:
        log.warning("train.sync_bn: no GPU, BatchNorm statistics stay per rank (set train.sync_bn: false for CPU runs)")
    global_batch = t.batch_per_device * t.grad_accum * world
    lr = recipe.optim.lr * global_batch / recipe.optim.lr_base_batch
    optimizer = create_optimizer_v2(
        model, opt="adamw", lr=lr, weight_decay=recipe.optim.weight_decay,
        betas=recipe.optim.betas, eps=recipe.optim.eps,
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(recipe, world))
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
    if recipe.model.compile:
        engine.compile()
    ema = ModelEmaV3(engine.module, decay=recipe.ema.decay, use_warmup=recipe.ema.warmup) if recipe.ema.enabled else None
    loss_fn = build_loss(recipe)
    grad_scaler = fp16_grad_scaler(engine)

    # Resume: the latest complete checkpoint in output_dir, without being asked.
    progress = dict(epoch=0, global_step=0, best_top1=-1.0, mlflow_run_id=None, elapsed_s=0.0)
    loader_state = None
    changed: list[str] = []
    if resumed is not None:
        tag = resumed[0].name
        engine.load_checkpoint(str(checkpoint_dir), tag=tag)
        progress = resumed[1]
        changed = recipe_changes(progress["recipe"], recipe_text)
        rank_state = ckpt.read_json(checkpoint_dir / tag / f"rank-{rank}.json")
        loader_state = LoaderState(**rank_state["loader"])
        set_rng_state(rank_state["rng"])
        if rank_state.get("grad_scaler"):
            grad_scaler.load_state_dict(rank_state["grad_scaler"])
        if ema is not None:
            ema.module.load_state_dict(ckpt.load_ema(checkpoint_dir, tag))
        if rank == 0:
            log.info("resuming from %s (epoch %d, step %d)", checkpoint_dir / tag, progress["epoch"], progress["global_step"])
    else:
        seed_everything(recipe.seed + 1 + rank)  # per-rank streams for drop path, erasing, Mixup
    # what the next checkpoint is made with
    progress.update(resume_identity=resume.identity(recipe, manifest, world), recipe=recipe_text)

    train_loader = TrainLoader(manifest, recipe.data, recipe.aug, t.batch_per_device, rank, world, num_classes,
                               device, seed=recipe.seed, state=loader_state)
    val_loader = ValLoader(manifest, recipe.data, t.val_batch_per_device, rank, world, device)
    steps_per_epoch = len(train_loader) // t.grad_accum
    total_steps = t.epochs * steps_per_epoch
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)
    scheduler = CosineLRScheduler(
        optimizer, t_initial=t.epochs * steps_per_epoch, lr_min=recipe.optim.min_lr * global_batch / recipe.optim.lr_base_batch,
        warmup_t=round(recipe.optim.warmup_epochs * steps_per_epoch), warmup_lr_init=recipe.optim.warmup_lr,
        t_in_epochs=False,
    )
    scheduler.step_update(progress["global_step"])

    node_index, hosts = node_layout(local_rank)
    system_metrics = recipe.tracking.system_metrics
    if system_metrics and len(hosts) > 1 and node_index is not None:  # the node of each series' name
        from mlflow.system_metrics import set_system_metrics_node_id

        set_system_metrics_node_id(f"node{node_index}")
    uri = tracking_uri(recipe.tracking.uri, recipe.output_dir)
    devices = f"{world} GPU{'s' * (world > 1)}" if device.type == "cuda" else f"{world} CPU rank{'s' * (world > 1)}"
    data_name = Path(recipe.data.shards).resolve().name
    tracker = NullTracker()
    if rank == 0:
        tags = {"model": recipe.model.name, "recipe": recipe.tracking.run_name, "nodes": str(len(hosts)),
                "job_id": os.environ.get("SLURM_JOB_ID", "local"),
                SOURCE_NAME_TAG: str(Path(__file__).resolve()),
                SOURCE_TYPE_TAG: "JOB" if "SLURM_JOB_ID" in os.environ else "LOCAL", GIT_COMMIT_TAG: git_commit()}
        if len(hosts) > 1:  # which machine each node's system metrics (system/nodeN/...) come from
            tags["node_hosts"] = " ".join(f"node{i}={host}" for i, host in enumerate(hosts))
        tracker = Tracker(uri, recipe.tracking.experiment, recipe.tracking.run_name, progress["mlflow_run_id"], tags,
                          system_metrics, spill_path=output_dir / SPILL_FILE)
        if progress["mlflow_run_id"] is None:
            params = flatten(to_dict(recipe))
            params.update(world_size=world, gpus=world if device.type == "cuda" else 0)
            tracker.log_params(params)
            tracker.log_manifest(manifest, recipe.data.shards)
            tracker.set_tags({NOTE_TAG: (
                f"{recipe.model.name} on {data_name} ({manifest.splits['train'].num_samples} train, "
                f"{manifest.splits['val'].num_samples} val images, {manifest.num_classes} classes), "
                f"{t.epochs} epochs on {devices}: training")})
            resolved = output_dir / "recipe.yaml"
            resolved.write_text(recipe_text)
            tracker.log_artifact(str(resolved))
        else:
            tracker.set_tags({"resumed_at_step": str(progress["global_step"])})
        if changed:  # MLflow params cannot change: the new recipe is an artifact, the step a tag
            step = progress["global_step"]
            log.info("resumed at step %d with a changed recipe: %s", step, ", ".join(changed))
            changed_recipe = output_dir / f"recipe-{ckpt.tag_for(step)}.yaml"
            changed_recipe.write_text(recipe_text)
            tracker.log_artifact(str(changed_recipe))
            tracker.set_tags({"recipe_changed_at_step": str(step), "recipe_changes": ", ".join(changed)})
    node_monitor = None
    if system_metrics and len(hosts) > 1:  # rank 0's Tracker monitors its node; the other nodes log into its run
        run_id = [tracker.run_id]
        dist.broadcast_object_list(run_id, src=0)
        if run_id[0] is None and rank == 0:
            log.warning("MLflow unreachable at the start: the other %d node(s) log no system metrics in this session",
                        len(hosts) - 1)
        elif run_id[0] is not None and node_index not in (None, 0):
            node_monitor = NodeMonitor(uri, run_id[0])

    def save(is_best: bool = False) -> None:
        nonlocal last_save
        step = progress["global_step"]
        tag = ckpt.tag_for(step)
        progress["elapsed_s"] = elapsed_before + time.monotonic() - started
        if rank == 0:
            progress["mlflow_run_id"] = tracker.run_id or progress["mlflow_run_id"]  # None while MLflow is away
        engine.save_checkpoint(str(checkpoint_dir), tag=tag, save_latest=False)
        rank_state = dict(loader=train_loader.state_dict(), rng=rng_state(),
                          grad_scaler=grad_scaler.state_dict() if grad_scaler is not None else None)
        ckpt.write_json_atomic(checkpoint_dir / tag / f"rank-{rank}.json", rank_state)
        if rank == 0:
            ckpt.write_json_atomic(checkpoint_dir / tag / "progress.json", progress)
            if ema is not None:
                ckpt.save_safetensors_atomic(ema.module.state_dict(), checkpoint_dir / tag / "ema.safetensors")
        dist.barrier()  # every rank's part is on disk
        if rank == 0:
            ckpt.mark_complete(checkpoint_dir, tag, is_best and recipe.checkpoint.keep_best)
            ckpt.prune(checkpoint_dir, recipe.checkpoint.keep_last)
        dist.barrier()
        last_save = time.monotonic()

    def evaluate_and_log() -> dict[str, float]:
        raw = evaluate(engine.module, val_loader, device, t.precision)
        metrics = {"val/top1": raw["top1"], "val/top5": raw["top5"], "val/loss": raw["loss"],
                   "val/num_images": raw["count"], "val/quarantined": raw["quarantined"]}
        if ema is not None:
            averaged = evaluate(ema.module, val_loader, device, t.precision)
            metrics.update({"val/top1_ema": averaged["top1"], "val/top5_ema": averaged["top5"], "val/loss_ema": averaged["loss"]})
        tracker.log_metrics(metrics, progress["global_step"])
        if rank == 0:
            log.info("eval epoch %d: %s (%d images)", progress["epoch"], " ".join(f"{k}={v:.3f}" for k, v in metrics.items()),
                     raw["count"])
        return metrics

    def agree(*flags: bool | torch.Tensor) -> list[bool]:
        """Each flag, true on any rank: every rank takes the same branch into collective work."""
        votes = torch.stack([torch.as_tensor(f, device=device).reshape(()).int() for f in flags])
        dist.all_reduce(votes, op=dist.ReduceOp.MAX)
        return [bool(v) for v in votes.tolist()]

    def interrupt() -> None:
        save()
        if rank == 0:
            log.warning("stop requested: saved %s; training stops here", checkpoint_dir / ckpt.tag_for(progress["global_step"]))
        tracker.set_tags({"interrupted_at_step": str(progress["global_step"])})
        if node_monitor is not None:
            node_monitor.finish(TRACKING_STOP_TIMEOUT_S)
        tracker.finish("KILLED", timeout=TRACKING_STOP_TIMEOUT_S)
        raise Interrupted(progress["global_step"])

    stop = stop or threading.Event()
    last_save = time.monotonic()
    metrics: dict[str, float] = {}
    start_step = progress["global_step"]
    started = time.monotonic()
    elapsed_before = progress.get("elapsed_s", 0.0)  # 0: a checkpoint from before fatscale counted it
    train_seconds = 0.0  # in the steps of this session, for images/s
    window = dict(images=0, wait=0.0, start=time.monotonic())
    every = recipe.checkpoint
    try:
        while progress["global_step"] < total_steps:
            engine.train()
            nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # over the micro-steps of a step
            fetch_start = epoch_start = time.monotonic()
            for images, targets in train_loader:
                window["wait"] += time.monotonic() - fetch_start
                loss = loss_fn(engine(images), targets)
                if t.precision != "fp16":  # fp16's loss scaler skips steps with inf/NaN gradients itself
                    nonfinite |= ~torch.isfinite(loss.detach())
                engine.backward(loss)
                grad_norm = None
                if t.zero_stage == 0 and (progress["global_step"] + 1) % t.log_every == 0 and engine.is_gradient_accumulation_boundary():
                    # DeepSpeed records the norm only in its ZeRO optimizers; before step() clips
                    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
                    grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
                    if grad_scaler is not None:  # fp16: the gradients are still multiplied by the loss scale
                        grad_norm /= grad_scaler.get_scale()
                engine.step()
                window["images"] += images.shape[0] * world
                fetch_start = time.monotonic()
                if engine.global_steps == progress["global_step"]:
                    continue  # accumulating gradients
                progress["global_step"] = step = engine.global_steps
                # One collective per step: divergence on any rank, a stop request (signal) on any
                # rank, and rank 0's clock for time-based saves.
                save_due = bool(every.every_steps and step % every.every_steps == 0) or (
                    rank == 0 and every.every_minutes is not None and time.monotonic() - last_save > 60 * every.every_minutes)
                diverged, stop_now, save_now = agree(nonfinite, stop.is_set(), save_due)
                if diverged:
                    last_good = ckpt.latest_tag(checkpoint_dir)
                    raise TrainingDiverged(
                        f"loss became NaN or infinite (rank {rank}: {loss.item()}) in step {step}, epoch {progress['epoch']}; "
                        "stopped without saving: " + (f"the last good checkpoint is {checkpoint_dir / last_good}"
                                                      if last_good else "there is no checkpoint yet"))
                nonfinite.zero_()
                scheduler.step_update(step)
                if ema is not None:
                    ema.update(engine.module, step=step)
                if step % t.log_every == 0 and rank == 0:
                    elapsed = time.monotonic() - window["start"]
                    rate = window["images"] / elapsed
                    remaining = (total_steps - step) * (time.monotonic() - started) / max(step - start_step, 1)
                    if grad_norm is None:
                        grad_norm = float(engine.get_global_grad_norm())
                    lr_now = optimizer.param_groups[0]["lr"]
                    log.info("epoch %d step %d/%d loss %.4f lr %.3g grad_norm %.3f %.0f img/s data_wait %.0f%% eta %s",
                             progress["epoch"], step, total_steps, loss.item(), lr_now, grad_norm, rate,
                             100 * window["wait"] / elapsed, time.strftime("%H:%M:%S", time.gmtime(remaining)))
                    tracker.log_metrics({"train/loss": loss.item(), "train/lr": lr_now, "train/grad_norm": grad_norm,
                                         "train/images_per_s": rate, "train/data_wait": window["wait"] / elapsed}, step)
                    window = dict(images=0, wait=0.0, start=time.monotonic())
                if stop_now:
                    interrupt()
                if step >= total_steps and train_loader.state.step < len(train_loader):
                    break  # train.max_steps, mid-epoch
                if save_now:
                    save()
                fetch_start = time.monotonic()
            train_seconds += time.monotonic() - epoch_start
            progress["epoch"] = train_loader.state.epoch
            finished = progress["global_step"] >= total_steps
            is_best = False
            if finished or progress["epoch"] % t.eval_every == 0:
                metrics = evaluate_and_log()
                is_best = metrics["val/top1"] > progress["best_top1"]
                progress["best_top1"] = max(progress["best_top1"], metrics["val/top1"])
            save(is_best)  # at every epoch end, and at the end
            if not finished and agree(stop.is_set())[0]:
                interrupt()

        if not metrics:  # resumed after the last evaluation
            metrics = evaluate_and_log()
        summary = {"top1": metrics["val/top1"], "best_top1": max(progress["best_top1"], metrics["val/top1"])}
        if ema is not None:
            summary["top1_ema"] = metrics["val/top1_ema"]
        if node_monitor is not None:
            node_monitor.finish(TRACKING_STOP_TIMEOUT_S)
        if rank == 0:
            step = progress["global_step"]
            tracker.log_metrics({"best_top1": summary["best_top1"]}, step)
            # The final checkpoint's raw and EMA weights, as logged models and registered model versions.
            for folder, key, which in zip(export(output_dir), ("top1", "top1_ema"), ("raw", "EMA")):
                name = f"{recipe.tracking.run_name}-{recipe.model.name}" + ("-ema" if key == "top1_ema" else "")
                tracker.log_model(name, folder, mlflow_flavors(recipe.model.name), {key: summary[key]}, step,
                                  params={"model": recipe.model.name, "weights": which, "num_classes": num_classes,
                                          "img_size": recipe.data.img_size},
                                  registered_name=name,
                                  description=f"{recipe.model.name}, {which} weights at step {step}: top-1 "
                                              f"{summary[key]:.2f}% on {data_name}/val ({metrics['val/num_images']:.0f} images)")
            steps_done = step - start_step
            throughput = f", {steps_done * global_batch / train_seconds:.0f} images/s" if steps_done else ""
            device_hours = (elapsed_before + time.monotonic() - started) * world / 3600
            ema_text = f" (EMA {summary['top1_ema']:.2f}%, best {summary['best_top1']:.2f}%)" if ema is not None else \
                f" (best {summary['best_top1']:.2f}%)"
            tracker.set_tags({NOTE_TAG: (
                f"**top-1 {summary['top1']:.2f}%**{ema_text} on {data_name}/val ({metrics['val/num_images']:.0f} images): "
                f"{recipe.model.name} trained on {data_name}/train ({manifest.splits['train'].num_samples} images, "
                f"{manifest.num_classes} classes) for {progress['epoch']} epochs ({step} steps){throughput}, "
                f"{device_hours:.3f} device-hours on {devices}.")})
            log_file = output_dir / "train.log"
            if log_file.exists():
                tracker.log_artifact(str(log_file))
            tracker.finish("FINISHED")
            log.info("done: %s", " ".join(f"{k}={v:.2f}" for k, v in summary.items()))
    except BaseException:
        if node_monitor is not None:
            node_monitor.finish(TRACKING_STOP_TIMEOUT_S)  # a no-op after interrupt()
        tracker.finish("FAILED", timeout=TRACKING_STOP_TIMEOUT_S)  # a no-op after interrupt(): the run stays KILLED
        raise
    dist.barrier()
    if run_lock is not None:
        run_lock.release()
    return summary


def _console_filter(record: logging.LogRecord) -> bool:
    return record.name.startswith("fatscale") or record.levelno >= logging.WARNING


def setup_logging(rank: int) -> None:
    """Rank 0: fatscale's records and every warning on the console, every record from INFO up in
    OUTPUT_DIR/train.log (once it holds the directory; those before are kept until then). Other
    ranks: warnings on the console."""
    global _early_records
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.addFilter(_console_filter)
    handlers: list[logging.Handler] = [console]
    if rank == 0:
        _early_records = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
        handlers.append(_early_records)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=handlers, format=LOG_FORMAT,
                        force=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train a recipe (one process per rank).")
    add_recipe_arguments(parser)
    args = parser.parse_args(argv)
    # torchrun passes SIGTERM on to the ranks (and kills them 30 s later): save and stop. The
    # same when torchrun itself dies, even by SIGKILL (the kernel sends the signal).
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    end_with_parent(signal.SIGTERM)
    recipe = load_recipe_or_exit(args.recipe, args.overrides)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)
    try:
        check_world(recipe, load_manifest(recipe.data.shards), int(os.environ.get("WORLD_SIZE", "1")), args.recipe)
        train(recipe, dump(recipe), stop)
    except Interrupted as e:
        log.info("%s; run the same command again to resume", e)
        sys.exit(128 + signal.SIGTERM)
    except TrainingDiverged as e:
        log.error("%s", e)
        sys.exit(1)
    except (RecipeError, RunDirBusy, resume.ResumeMismatch) as e:  # the same on every rank: said once
        if rank == 0:
            log.error("%s", e)
        sys.exit(1)


if __name__ == "__main__":
    main()
