"""What SyncBatchNorm (train.sync_bn) costs, as far as one GPU can show it.

    python -m benchmarks.gpu.check_syncbn --out DIR [--device cuda|cpu] [--tiny]

torch's SyncBatchNorm synchronizes only when the world size is above 1, and NCCL refuses two ranks
on one GPU; so two ranks share the GPU over gloo. Each trains FAT-B0 (forward, backward, fused
AdamW; bf16, channels_last, half of batch 128 each, 224 px) with the model fatscale's trainer
builds: at world size 1 (BatchNorm) and at world size 2 (SyncBatchNorm). No gradient all-reduce
runs, so SyncBatchNorm's own collectives are the only difference between the two. Results:
  syncbn   images/s of the two ranks together, BatchNorm vs SyncBatchNorm; the converted layers and
           the collectives they add per step (an all-gather forward, an all-reduce backward each);
           host syncs per step on rank 0 (SyncBatchNorm waits for the gathered counts in each layer)
gloo sends each collective through host memory, so the slowdown is an upper bound of NCCL's
between GPUs; the host syncs are the same with NCCL. On a CPU torch refuses SyncBatchNorm, so
the dry run measures BatchNorm alone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.gpu.common import REPO, check_main, free_port
from benchmarks.gpu.results import Results

WORLD = 2


def rank_main(rank: int, port: int, device_name: str, tiny: bool, out: Path) -> None:
    """One rank: both arms, its figures to ``out``/rank<rank>.json."""
    import torch
    import torch.distributed as dist

    from benchmarks.gpu import data
    from benchmarks.gpu.syncs import HostSyncs
    from fatscale.config import load_recipe
    from fatscale.train import components

    if tiny:
        torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    device = torch.device("cuda", 0) if device_name == "cuda" else torch.device("cpu")
    size, batch, steps = (32, 2, 2) if tiny else (224, 64, 10)
    recipe = load_recipe(REPO / "recipes" / "fat_b0_300ep.yaml", ["model.num_classes=1000"], check_shards=False)
    loss_fn = components.build_loss(recipe)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    batches = data.batches(steps, batch, size, device, seed=rank)
    figures = {}
    for arm, world in (("batchnorm", 1), ("syncbatchnorm", WORLD)):
        torch.manual_seed(0)
        model = components.build_model(recipe, 1000, world, device).to(device)
        synced = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
        optimizer = components.build_optimizer(recipe, model, recipe.train.batch_per_device * world)

        def step(x, y):
            with autocast:
                loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for x, y in batches[:2]:  # warm-up: kernels chosen, buffers allocated
            step(x, y)
        with HostSyncs(device) as syncs:
            step(*batches[0])
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        for x, y in batches:
            step(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        figures[arm] = dict(images_per_s=WORLD * batch * steps / (time.perf_counter() - start), synced_layers=synced,
                            syncs_per_step=syncs.per_step(1), sync_sites=syncs.top(1))
        if device.type != "cuda":
            break  # torch's SyncBatchNorm runs on GPUs only (the trainer converts on GPUs only)
    (out / f"rank{rank}.json").write_text(json.dumps(figures))
    dist.destroy_process_group()


def run(args: argparse.Namespace, results: Results) -> None:
    import torch.multiprocessing as mp

    mp.spawn(rank_main, args=(free_port(), args.device, args.tiny, args.work), nprocs=WORLD)
    figures = json.loads((args.work / "rank0.json").read_text())
    plain = figures["batchnorm"]
    if "syncbatchnorm" not in figures:
        results("syncbn", "SKIP", f"no GPU: torch's SyncBatchNorm needs one; BatchNorm {plain['images_per_s']:.0f} img/s "
                f"(2 gloo ranks)", batchnorm=plain)
        return
    synced = figures["syncbatchnorm"]
    ratio = synced["images_per_s"] / plain["images_per_s"]
    results("syncbn", "PASS", f"2 ranks on one GPU over gloo: BatchNorm {plain['images_per_s']:.0f} img/s, SyncBatchNorm "
            f"{synced['images_per_s']:.0f}: x{ratio:.2f} (a lower bound for NCCL's); {synced['synced_layers']} "
            f"layers, {2 * synced['synced_layers']} collectives/step; host syncs/step {plain['syncs_per_step']:g} -> "
            f"{synced['syncs_per_step']:g} ({synced['sync_sites']})", batchnorm=plain, syncbatchnorm=synced,
            ratio=ratio)


if __name__ == "__main__":
    check_main("syncbn", __doc__, run)
