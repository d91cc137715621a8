"""The Trainer: builds a run's components from its recipe, resumes, and trains.

``Trainer(recipe, recipe_text, stop)`` on every rank: distributed setup and the output directory
(locked for this run) -> data, model, optimizer, DeepSpeed engine, EMA, loss -> resume from the
latest checkpoint in output_dir, if any (refused if made by an incompatible recipe) -> loaders,
LR schedule, reporting. ``train()`` runs epochs of steps with periodic logging and checkpoints,
evaluates the raw and EMA models, exports and registers the final weights, and returns the
top-1 summary. Setting ``stop`` (a signal handler does) on any rank makes every rank save at the
next step and raise :class:`Interrupted`.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import deepspeed
from fatscale.checkpoint import resume
from fatscale.checkpoint.checkpointer import Checkpointer
from fatscale.checkpoint.state import TrainState, seed_everything
from fatscale.config import Recipe
from fatscale.data import ledger
from fatscale.data.loader import TrainLoader, ValLoader
from fatscale.data.manifest import load_manifest
from fatscale.export import export
from fatscale.train import components
from fatscale.train.distributed import StepVote, agree, configure_backends, hold_output_dir, init_distributed
from fatscale.train.evaluation import evaluate
from fatscale.train.logs import log_to_file
from fatscale.train.reporting import Reporter
from fatscale.train.watchdog import Watchdog
from timm.utils import ModelEmaV3, distribute_bn

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite outside fp16 loss scaling."""


class Interrupted(Exception):
    """Training stopped on request (preemption, time limit, SIGTERM) after saving a checkpoint."""

    def __init__(self, step: int):
        super().__init__(f"interrupted at step {step}, checkpoint saved")
        self.step = step


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process: one per input size it specialised for, so a
    resolution schedule's recompiles show (dynamo's automatic dynamic shapes bound them)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


class Trainer:
    def __init__(self, recipe: Recipe, recipe_text: str, stop: threading.Event | None = None,
                 on_stall: Callable[[str], None] | None = None):
        self.recipe, self.stop = recipe, stop or threading.Event()
        t = recipe.train
        configure_backends(t.deterministic)
        self.rank, self.world, local_rank, self.device = init_distributed()
        output_dir = Path(recipe.output_dir)
        self.run_lock = hold_output_dir(output_dir, self.rank)
        if self.rank == 0:
            log_to_file(output_dir / "train.log")
            (output_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        torch.distributed.barrier()
        manifest = load_manifest(recipe.data.shards)
        num_classes = recipe.model.num_classes or manifest.num_classes
        resumed = resume.check_output_dir_on_rank_0(recipe, manifest, self.world, self.rank)  # before any state is built
        progress = None if resumed is None else {**resumed[1], "checkpoint": resumed[0]}
        # The run's global batch on this world (fatscale.checkpoint.resume): the recipe's, or the checkpoint's
        self.layout = resume.layout(recipe, self.world, progress)
        saved_world = self.world if progress is None else progress["resume_identity"]["world_size"]
        if self.rank == 0 and (self.layout.micro_batch, self.layout.grad_accum) != (t.batch_per_device, t.grad_accum):
            made_by = "" if progress is None else f" (the checkpoint's: {saved_world})"
            log.info("%d ranks%s: %s", self.world, made_by, self.layout.describe())

        seed_everything(recipe.seed)  # identical initial weights on every rank
        model = components.build_model(recipe, num_classes, self.world, self.device).to(self.device)
        # Fine-tuning starts a fresh run from trained weights; a resumed run has its own.
        initialised_from = components.init_weights(recipe, model) \
            if recipe.model.init_from and resumed is None else None
        if self.world > 1 and t.sync_bn and self.device.type != "cuda" and self.rank == 0:
            log.warning("train.sync_bn: no GPU, BatchNorm statistics stay per rank (set train.sync_bn: false for CPU runs)")
        # The EMA copies the bare module, before DeepSpeed hooks into it and before it is compiled:
        # it only evaluates, eagerly.
        self.ema = ModelEmaV3(model, decay=recipe.ema.decay, use_warmup=recipe.ema.warmup) \
            if recipe.ema.enabled else None
        self.optimizer = components.build_optimizer(recipe, model, self.layout.global_batch)
        resharding = saved_world != self.world and t.zero_stage > 0  # fatscale.checkpoint.checkpointer
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=self.optimizer,
                                               config=components.deepspeed_config(recipe, self.layout, resharding))
        if recipe.model.compile:
            self.engine.compile(backend=recipe.model.compile_backend)
        self.loss_fn = components.build_loss(recipe)
        self.grad_scaler = components.fp16_grad_scaler(self.engine)
        self.train_loader = TrainLoader(manifest, recipe.data, recipe.aug, self.layout.micro_batch, self.rank,
                                        self.world, num_classes, self.device, seed=recipe.seed,
                                        grad_accum=self.layout.grad_accum)
        # The recipe's eval size first (its top-1 is val/top1), then data.eval_sizes.
        self.val_loaders = {size: ValLoader(manifest, recipe.data, t.val_batch_per_device, self.rank, self.world,
                                            self.device, img_size=size)
                            for size in recipe.data.val_sizes}
        self.state, changed = TrainState(), []
        identity = dict(recipe=recipe_text, resume_identity={
            **resume.identity(recipe, manifest), "global_batch": self.layout.global_batch, "world_size": self.world})
        self.checkpointer = Checkpointer(recipe.checkpoint, output_dir / "checkpoints", self.rank, engine=self.engine,
                                         state=self.state, loader=self.train_loader, identity=identity,
                                         ema=self.ema.module if self.ema is not None else None,
                                         grad_scaler=self.grad_scaler)
        if resumed is not None:
            checkpoint, progress = resumed
            self.checkpointer.load(checkpoint.name, recipe.seed, saved_world)
            changed = resume.recipe_changes(progress["recipe"], recipe_text)
            if self.rank == 0:
                log.info("resuming from %s (epoch %d, step %d)", checkpoint, self.state.epoch, self.state.global_step)
        else:
            seed_everything(recipe.seed + 1 + self.rank)  # per-rank streams for drop path, erasing, Mixup
        self.ledger = self._open_ledger() if t.sample_log else None
        steps_per_epoch = self.train_loader.steps_per_epoch
        self.total_steps = min(t.epochs * steps_per_epoch, t.max_steps or t.epochs * steps_per_epoch)
        self.scheduler = components.build_scheduler(recipe, self.optimizer, self.layout.global_batch, steps_per_epoch)
        self.scheduler.step_update(self.state.global_step)
        self.reporter = Reporter(recipe, manifest, self.state, self.rank, local_rank, self.world, self.device)
        self.reporter.started(self.state, recipe_text, changed, self.layout.global_batch, initialised_from)
        self.metrics: dict[str, float] = {}  # of the last evaluation
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)  # a micro-step's loss, since the last step
        self.vote = StepVote(self.device)
        self.losses: dict[int, torch.Tensor] = {}  # of the steps whose vote is not read yet, for a divergence
        self._last_size = None  # the train size last logged
        self.watchdog = Watchdog(self.rank, self.world, t.stall_timeout_s, on_stall)
        self.session_start, self.session_step = time.monotonic(), self.state.global_step
        self.elapsed_before, self.device_before = self.state.elapsed_s, self.state.device_s  # the sessions before this one
        self.train_seconds = 0.0  # in this session's epochs, for images/s

    # ------------------------------------------------------------ the loop

    def train(self) -> dict[str, float]:
        """Epochs until the last step, each followed by an evaluation (every ``eval_every``) and a
        checkpoint; then the final evaluation, export and MLflow summary."""
        self.watchdog.start()
        try:
            while self.state.global_step < self.total_steps:
                epoch_start = time.monotonic()
                self.train_epoch()
                self.train_seconds += time.monotonic() - epoch_start
                self.state.epoch = self.train_loader.state.epoch
                finished = self.state.global_step >= self.total_steps
                is_best = False
                if finished or self.state.epoch % self.recipe.train.eval_every == 0:
                    is_best = self.evaluate()
                self.save(is_best)  # at every epoch end, and at the end
                self.watchdog.enter("a collective (epoch end)", self.state.global_step)
                if not finished and agree(self.device, self.stop.is_set())[0]:
                    self.interrupt()
            if not self.metrics:  # resumed after the last evaluation
                self.evaluate()
            summary = self.finish()
        except BaseException:
            self.reporter.failed()
            raise
        finally:
            self.watchdog.stop()
        self.close()
        return summary

    def train_epoch(self) -> None:
        """The rest of the current epoch (or up to ``train.max_steps``), one optimizer step at a time,
        with the per-step agreement of all ranks on divergence, stop requests and time-based saves."""
        self.engine.train()
        if self.rank == 0 and self.train_loader.img_size != self._last_size:
            log.info("epoch %d: training at %d px", self.state.epoch, self.train_loader.img_size)
            self._last_size = self.train_loader.img_size
        step_samples = []  # of the step being accumulated, for the sample ledger
        for images, targets in self._timed(self.train_loader):
            if self.ledger is not None:
                step_samples.append(self.train_loader.indices)
            loss, grad_norm = self.train_step(images, targets)
            if loss is None:
                continue  # accumulating gradients
            step = self.state.global_step
            if self.ledger is not None:
                self.ledger.record(step, self.train_loader.state.epoch,
                                   self.train_loader.keys(np.concatenate(step_samples)))
                step_samples = []
            # One collective per step, read a step later (StepVote): divergence on any rank, a stop
            # request (signal) on any rank, and rank 0's clock for time-based saves.
            self.watchdog.enter("a collective (the step's vote)", step)
            voted = self.vote.cast(step, self.nonfinite, self.stop.is_set(),
                                   self.checkpointer.due_by_clock(time.monotonic()))
            self.nonfinite.zero_()
            self.losses[step] = loss
            self.scheduler.step_update(step)
            if self.ema is not None:
                self.ema.update(self.engine.module, step=step)
            if step % self.recipe.train.log_every == 0 and self.rank == 0:
                self._report_step(loss, grad_norm)
            self._act_on(voted)
            if step >= self.total_steps and self.train_loader.state.step < len(self.train_loader):
                break  # train.max_steps, mid-epoch
            if self.checkpointer.due_by_steps(step):
                self.save()
        self._act_on(self.vote.result(), saving=True)  # the epoch-end save follows

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor | None, float | None]:
        """One micro-batch: forward, backward, DeepSpeed's step. Returns the loss once an optimizer
        step is complete (None while accumulating) and, on logging steps without ZeRO, the
        gradient norm before clipping."""
        t = self.recipe.train
        self.watchdog.enter("forward/backward", self.state.global_step + 1)
        loss = self.loss_fn(self.engine(images), targets)
        if t.precision != "fp16":  # fp16's loss scaler skips steps with inf/NaN gradients itself
            self.nonfinite |= ~torch.isfinite(loss.detach())
        self.engine.backward(loss)
        grad_norm = None
        if (t.zero_stage == 0 and (self.state.global_step + 1) % t.log_every == 0
                and self.engine.is_gradient_accumulation_boundary()):
            # DeepSpeed records the norm only in its ZeRO optimizers; before step() clips
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
            if self.grad_scaler is not None:  # fp16: the gradients are still multiplied by the loss scale
                grad_norm /= self.grad_scaler.get_scale()
        self.watchdog.enter("optimizer step", self.state.global_step + 1)
        self.engine.step()
        if self.engine.global_steps == self.state.global_step:
            return None, None
        self.state.global_step = self.engine.global_steps
        return loss, grad_norm

    def evaluate(self) -> bool:
        """The raw and EMA models on the val split at every eval size, logged (``val/top1`` at the
        recipe's eval size, ``val/top1_Spx`` at each: MLflow keys cannot hold "@"); whether the raw
        top-1 is the best so far."""
        models = {"": self.engine.module, "_ema": self.ema.module if self.ema is not None else None}
        if self.world > 1:
            # Without SyncBatchNorm (CPU ranks, train.sync_bn: false) each rank has BatchNorm statistics
            # of its own, and a checkpoint keeps rank 0's: every rank evaluates with those, so the
            # figures are those of the saved weights (python -m fatscale.evaluate gets them back).
            for model in models.values():
                if model is not None:
                    distribute_bn(model, self.world)
        metrics: dict[str, float] = {}
        sized = len(self.val_loaders) > 1  # the keys with the size only when there are several sizes
        for i, (size, loader) in enumerate(self.val_loaders.items()):
            for suffix, model in models.items():
                if model is None:
                    continue
                # Eagerly, also a compiled model (engine.compile() compiles the module in place):
                # compiled, each eval size and last partial batch would add graphs, for ~1/50 of an
                # epoch's work.
                self.watchdog.enter(f"evaluating{suffix} at {size} px", self.state.global_step)
                with torch.compiler.set_stance("force_eager"):
                    result = evaluate(model, loader, self.device, self.recipe.train.precision)
                for key in ("top1", "top5", "loss"):
                    if sized:
                        metrics[f"val/{key}{suffix}_{size}px"] = result[key]
                    if i == 0:
                        metrics[f"val/{key}{suffix}"] = result[key]
                if i == 0 and not suffix:
                    metrics.update({"val/num_images": result["count"], "val/quarantined": result["quarantined"]})
        self.reporter.evaluated(self.state, metrics)
        self.metrics = metrics
        is_best = metrics["val/top1"] > self.state.best_top1
        self.state.best_top1 = max(self.state.best_top1, metrics["val/top1"])
        return is_best

    def save(self, is_best: bool = False) -> Path:
        self._act_on(self.vote.result(), saving=True)  # never save the weights of a diverged step
        self.watchdog.enter("saving", self.state.global_step)
        self._count_elapsed()
        if self.rank == 0:
            self.state.mlflow_run_id = self.reporter.run_id or self.state.mlflow_run_id  # None while MLflow is away
        return self.checkpointer.save(is_best)

    def interrupt(self) -> None:
        saved = self.save()
        self.reporter.interrupted(self.state, saved)
        raise Interrupted(self.state.global_step)

    def finish(self) -> dict[str, float]:
        """The final top-1 summary; rank 0 exports the last checkpoint's weights and reports."""
        summary = {"top1": self.metrics["val/top1"], "best_top1": self.state.best_top1}
        if self.ema is not None:
            summary["top1_ema"] = self.metrics["val/top1_ema"]
        if len(self.val_loaders) > 1:
            for size in self.val_loaders:
                summary[f"top1_{size}px"] = self.metrics[f"val/top1_{size}px"]
        steps = self.state.global_step - self.session_step
        images_per_s = steps * self.layout.global_batch / self.train_seconds if steps else None
        self._count_elapsed()
        exported = export(Path(self.recipe.output_dir)) if self.rank == 0 else []
        self.reporter.finished(self.state, summary, self.metrics, exported, images_per_s)
        return summary

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()
        torch.distributed.barrier()
        if self.run_lock is not None:
            self.run_lock.release()

    # ------------------------------------------------------------ helpers

    def _count_elapsed(self) -> None:
        session = time.monotonic() - self.session_start
        self.state.elapsed_s = self.elapsed_before + session
        self.state.device_s = self.device_before + session * self.world

    def _open_ledger(self) -> ledger.SampleLedger:
        """This rank's sample ledger, after rank 0 cut every rank's file back to this run's step."""
        if self.rank == 0:
            ledger.cut_back(Path(self.recipe.output_dir), self.state.global_step)
        torch.distributed.barrier()
        return ledger.SampleLedger(Path(self.recipe.output_dir), self.rank)

    def _timed(self, loader: TrainLoader):
        """The loader's batches, each with the time spent waiting for it reported."""
        batches = iter(loader)
        while True:
            start = time.monotonic()
            self.watchdog.enter("loading data", self.state.global_step + 1)
            try:
                images, targets = next(batches)
            except StopIteration:
                return
            self.reporter.waited(time.monotonic() - start, images.shape[0] * self.world)
            yield images, targets

    def _report_step(self, loss: torch.Tensor, grad_norm: float | None) -> None:
        step = self.state.global_step
        per_step = (time.monotonic() - self.session_start) / max(step - self.session_step, 1)
        if grad_norm is None:
            grad_norm = float(self.engine.get_global_grad_norm())
        lr = max(group["lr"] for group in self.optimizer.param_groups)  # the head's, under optim.layer_decay
        self.reporter.step(self.state, self.total_steps, loss.item(), lr, grad_norm,
                           eta_s=(self.total_steps - step) * per_step, img_size=self.train_loader.img_size,
                           compiled_graphs=compiled_graphs() if self.recipe.model.compile else None)

    def _act_on(self, voted: tuple[int, list[bool]] | None, saving: bool = False) -> None:
        """What the ranks agreed on in step ``voted[0]``, acted on now (at most a step later): stop
        on divergence without saving; save and stop on a stop request; save when rank 0's clock
        says so (unless ``saving`` already)."""
        if voted is None:
            return
        step, (diverged, stop_now, save_now) = voted
        loss = self.losses.pop(step)
        self.losses = {s: v for s, v in self.losses.items() if s > step}
        if diverged:
            last_good = self.checkpointer.latest()
            raise TrainingDiverged(
                f"loss became NaN or infinite (rank {self.rank}: {loss.item()}) in step {step}, "
                f"epoch {self.state.epoch}; stopped without saving: "
                + (f"the last good checkpoint is {last_good}" if last_good else "there is no checkpoint yet"))
        if stop_now:
            self.interrupt()
        if save_now and not saving:
            self.save()


def train(recipe: Recipe, recipe_text: str, stop: threading.Event | None = None,
          on_stall: Callable[[str], None] | None = None) -> dict[str, float]:
    """Train ``recipe`` on this rank; returns the final top-1 summary. ``on_stall`` runs before the
    rank exits on a stall (fatscale.train.watchdog). The process group ends with the training,
    however it ends (NCCL's communicators are then freed, not left to the interpreter's exit)."""
    try:
        return Trainer(recipe, recipe_text, stop, on_stall).train()
    finally:
        if torch.distributed.is_initialized():
            deepspeed.comm.destroy_process_group()  # torch's, and DeepSpeed's references to its groups
