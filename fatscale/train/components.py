"""The pieces a recipe names, built the way the official FAT setup trains them: the timm model,
AdamW without weight decay on 1-D parameters, DeepSpeed's configuration, the per-step cosine
schedule, and the loss that matches the loader's targets."""

from __future__ import annotations

import logging

import torch

import fatscale  # noqa: F401  (registers the FAT models with timm)
import timm
from fatscale.config import Recipe
from fatscale.data.sample_order import BatchLayout
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

log = logging.getLogger(__name__)


def build_model(recipe: Recipe, num_classes: int, world: int, device: torch.device) -> torch.nn.Module:
    m = recipe.model
    kwargs = dict(num_classes=num_classes, bidirectional=m.bidirectional, norm_keeps_format=m.norm_keeps_format)
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


def init_weights(recipe: Recipe, model: torch.nn.Module):
    """Fine-tuning: ``model.init_from``'s weights in ``model`` (fatscale.weights: strict, but the
    classifier is re-initialised when the number of classes differs). Returns the loaded Weights."""
    from fatscale.weights import init_from, load_into

    weights = init_from(recipe)
    new_head = load_into(model, recipe.model.name, weights)
    log.info("initialised from %s%s", weights.description,
             f"; the classifier is re-initialised ({weights.state_dict['head.weight'].shape[0]} classes there, "
             f"{model.num_classes} here)" if new_head else "")
    return weights


def lr_scale(recipe: Recipe, global_batch: int) -> float:
    """The recipe's learning rates are for a global batch of ``optim.lr_base_batch``: linear scaling."""
    return global_batch / recipe.optim.lr_base_batch


def build_optimizer(recipe: Recipe, model: torch.nn.Module, global_batch: int) -> torch.optim.Optimizer:
    """timm's AdamW param groups; torch's fused kernel when ``optim.fused`` and the model is on a GPU."""
    o = recipe.optim
    fused = o.fused and next(model.parameters()).is_cuda
    return create_optimizer_v2(model, opt="adamw", lr=o.lr * lr_scale(recipe, global_batch),
                               weight_decay=o.weight_decay, betas=o.betas, eps=o.eps, layer_decay=o.layer_decay,
                               **({"fused": True} if fused else {}))


def build_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, global_batch: int,
                    steps_per_epoch: int) -> CosineLRScheduler:
    """Per optimizer step (``step_update(step)``): warmup from ``warmup_lr``, cosine to ``min_lr``."""
    o = recipe.optim
    return CosineLRScheduler(optimizer, t_initial=recipe.train.epochs * steps_per_epoch,
                             lr_min=o.min_lr * lr_scale(recipe, global_batch),
                             warmup_t=round(o.warmup_epochs * steps_per_epoch), warmup_lr_init=o.warmup_lr,
                             t_in_epochs=False)


def deepspeed_config(recipe: Recipe, layout: BatchLayout, load_universal: bool = False) -> dict:
    """``load_universal``: the checkpoint to load was resharded for this world size (fatscale.checkpoint.checkpointer)."""
    t = recipe.train
    config = {
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": layout.grad_accum,
        "train_batch_size": layout.global_batch,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "steps_per_print": 10**9,  # fatscale logs
        "wall_clock_breakdown": False,
        # On by default, and without a dataloader given to deepspeed.initialize the engine starts
        # and stops it in every forward and step, each a device synchronize: fatscale times itself.
        "timers": {"throughput": {"enabled": False}},
        "checkpoint": {"load_universal": load_universal},
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


def build_loss(recipe: Recipe) -> torch.nn.Module:
    a = recipe.aug
    if a.mixup > 0 or a.cutmix > 0:
        return SoftTargetCrossEntropy()  # the loader's Mixup already smoothed the targets
    if a.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=a.label_smoothing)
    return torch.nn.CrossEntropyLoss()
