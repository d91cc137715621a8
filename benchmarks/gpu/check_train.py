"""The trainer's step on one GPU, FAT-B0 and B3 at batch 128 and 224 px, through fatscale's own
Trainer (recipes/fat_b0_300ep.yaml: bf16, fused AdamW, clipping, EMA, DeepSpeed; see
benchmarks/gpu/trainer_harness.py), on fixed synthetic batches.

    python -m benchmarks.gpu.check_train --out DIR [--models fat_b0 fat_b3] [--device cuda|cpu] [--tiny]

In the order of their worth (the suite stops the check at its time limit; what was measured by
then is kept), per model:
  train_<model>_eager     images/s of the trainer's loop, peak GPU memory, host syncs per step and
                          where they are made (benchmarks/gpu/syncs.py)
  train_<model>_compiled  the same once compiled as the Trainer compiles (torch.compile through the
                          DeepSpeed engine, inductor): the figure the GPU-hours projection uses
  compile_<model>         seconds to compile the first graph (training, 224 px)
then, eager:
  norm_<model>            images/s with timm's GroupNorm1 (model.norm_keeps_format=false) against
                          the format-keeping GroupNorm (the default)
  syncs_throughput_timer  host syncs per step with DeepSpeed's throughput timer as DeepSpeed
                          defaults it (on, synchronizing the GPU) against fatscale's config
and for the first model, compile_<model> again with the eval graph and the recompile at a size
change (224 -> 160 px, as a resolution schedule makes one; the direction does not matter to it),
and the graphs made.
Host syncs are counted over steps that log nothing (a logging step, every train.log_every, adds
its own). Images/s: batch x steps / seconds, the GPU's queue drained before and after.
"""

from __future__ import annotations

import argparse

from benchmarks.gpu import data
from benchmarks.gpu import trainer_harness as harness
from benchmarks.gpu.common import attempt, check_main, gib
from benchmarks.gpu.results import Results
from benchmarks.gpu.syncs import HostSyncs


def steps_for(tiny: bool) -> dict[str, int]:
    return dict(warmup=1, timed=2, counted=1) if tiny else dict(warmup=3, timed=12, counted=3)


def measure(trainer, batches: list, counts: dict[str, int]) -> dict:
    """Warm up, time, then count host syncs: images/s, peak GiB, syncs per step and their sites."""
    import torch

    device = trainer.device
    harness.train_steps(trainer, batches[:counts["warmup"]])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = harness.train_steps(trainer, batches[:counts["timed"]])
    peak = gib(torch.cuda.max_memory_allocated()) if device.type == "cuda" else None
    trainer.train_loader = harness.SyntheticLoader(batches[:counts["counted"]])
    with HostSyncs(device) as syncs:
        trainer.train_epoch()
    batch = batches[0][0].shape[0]
    return dict(images_per_s=batch * counts["timed"] / seconds, peak_gib=peak,
                syncs_per_step=syncs.per_step(counts["counted"]), sync_sites=syncs.top(counts["counted"]))


def figure(m: dict) -> str:
    memory = f", peak {m['peak_gib']:.1f} GiB" if m["peak_gib"] is not None else ""
    syncs = "" if m["syncs_per_step"] is None else f", {m['syncs_per_step']:g} host syncs/step ({m['sync_sites']})"
    return f"{m['images_per_s']:.0f} img/s{memory}{syncs}"


def measure_new(args: argparse.Namespace, model: str, overrides: tuple[str, ...] = ()) -> dict:
    """measure() of a Trainer built for this variant alone, released afterwards."""
    size, batch, _ = harness.sizes(args.tiny)
    trainer = harness.build(model, args.device, args.tiny, args.work, overrides)
    figures = measure(trainer, data.batches(steps_for(args.tiny)["timed"], batch, size, trainer.device),
                      steps_for(args.tiny))
    harness.release(trainer)
    return figures


def eager_and_compiled(args: argparse.Namespace, results: Results, model: str, eager: dict, compiles: dict):
    """The model's Trainer measured eager, then compiled; returns it (compiled) for more graphs."""
    from fatscale.train.trainer import compiled_graphs

    size, batch, _ = harness.sizes(args.tiny)
    counts = steps_for(args.tiny)
    trainer = harness.build(model, args.device, args.tiny, args.work)
    batches = data.batches(counts["timed"], batch, size, trainer.device)
    setup = dict(img_size=size, batch=batch, precision=trainer.recipe.train.precision)
    said = f"batch {batch}, {size} px, {setup['precision']}"
    eager[model] = measure(trainer, batches, counts)
    results(f"train_{model}_eager", "PASS", f"{figure(eager[model])}; {said}, eager", **setup, **eager[model])
    graphs_before = compiled_graphs()
    harness.compile_engine(trainer)
    first_s = harness.train_steps(trainer, batches[:1])
    compiled = measure(trainer, batches, counts)
    compiles[model] = dict(first_s=first_s, graphs=compiled_graphs() - graphs_before)
    backend = trainer.recipe.model.compile_backend
    results(f"train_{model}_compiled", "PASS", f"{figure(compiled)}; x{compiled['images_per_s'] / eager[model]['images_per_s']:.2f} "
            f"of eager; {said}, torch.compile ({backend})", backend=backend, **setup, **compiled)
    results(f"compile_{model}", "PASS", f"first graph {first_s:.0f} s, {compiles[model]['graphs']} graph(s) ({backend})",
            **compiles[model])
    return trainer


def more_graphs(args: argparse.Namespace, results: Results, trainer, compiled: dict) -> None:
    """The compiled Trainer's eval graph and its recompile at a size change, and the graphs made."""
    from fatscale.train.trainer import compiled_graphs

    size, batch, other_size = harness.sizes(args.tiny)
    model = trainer.recipe.model.name
    graphs_before = compiled_graphs()
    eval_s = harness.evaluate(trainer, data.batches(2, batch, size, trainer.device))
    resize_s = harness.train_steps(trainer, data.batches(1, batch, other_size, trainer.device, seed=1))
    graphs = compiled["graphs"] + compiled_graphs() - graphs_before
    backend = trainer.recipe.model.compile_backend
    results(f"compile_{model}", "PASS", f"first graph {compiled['first_s']:.0f} s, eval graph {eval_s:.0f} s, "
            f"{size} -> {other_size} px {resize_s:.0f} s; {graphs} graphs ({backend})",
            first_s=compiled["first_s"], eval_s=eval_s, resize_s=resize_s, graphs=graphs)


def norm_variant(args: argparse.Namespace, results: Results, model: str, eager: dict) -> None:
    from fatscale.config import RecipeError

    try:
        timm_norm = measure_new(args, model, ("model.norm_keeps_format=false",))
    except RecipeError as e:
        results(f"norm_{model}", "SKIP", f"this fatscale has no model.norm_keeps_format ({e})")
        return
    ratio = eager[model]["images_per_s"] / timm_norm["images_per_s"]
    results(f"norm_{model}", "PASS", f"format-keeping GroupNorm {eager[model]['images_per_s']:.0f} img/s, timm's "
            f"GroupNorm1 {figure(timm_norm)}: x{ratio:.2f} (eager)", groupnorm1=timm_norm, ratio=ratio)


def timer_variant(args: argparse.Namespace, results: Results, model: str, eager: dict) -> None:
    """DeepSpeed's throughput timer as DeepSpeed defaults it, in the config the Trainer builds."""
    from fatscale.train import components

    fatscale_config = components.deepspeed_config

    def timer_on(recipe, layout, load_universal=False):
        return {**fatscale_config(recipe, layout, load_universal),
                "timers": {"throughput": {"enabled": True, "synchronized": True}}}

    components.deepspeed_config = timer_on
    try:
        default = measure_new(args, model)
    finally:
        components.deepspeed_config = fatscale_config
    ours = eager[model]
    if ours["syncs_per_step"] is None:
        results("syncs_throughput_timer", "SKIP", f"host syncs are counted on a GPU only; {default['images_per_s']:.0f} "
                f"img/s with DeepSpeed's timer, {ours['images_per_s']:.0f} with fatscale's config")
        return
    results("syncs_throughput_timer", "PASS", f"{model} eager: DeepSpeed's default timer {figure(default)}; fatscale's "
            f"config {figure(ours)}", timer_default=default, fatscale=ours)


def run(args: argparse.Namespace, results: Results) -> None:
    """The figures in the order of their worth: each model's eager and compiled step first (the
    first model's compiled Trainer kept), then the eager variants, then the first model's other graphs."""
    eager: dict[str, dict] = {}
    compiles: dict[str, dict] = {}
    kept = None
    for model in args.models:
        with attempt(results, f"train_{model}"):
            trainer = eager_and_compiled(args, results, model, eager, compiles)
            if kept is None:
                kept = trainer
            else:
                harness.release(trainer)
    for model in eager:
        with attempt(results, f"norm_{model}"):
            norm_variant(args, results, model, eager)
    if eager:
        with attempt(results, "syncs_throughput_timer"):
            timer_variant(args, results, next(iter(eager)), eager)
    if kept is not None:
        model = kept.recipe.model.name
        with attempt(results, f"compile_{model}"):
            more_graphs(args, results, kept, compiles[model])


if __name__ == "__main__":
    check_main("train", __doc__, run)
