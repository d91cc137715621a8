"""The trainer's GPU path without data: a bf16 DeepSpeed step under NCCL (world size 1), a
checkpoint save/resume round trip through fatscale's weights-only loader, SyncBatchNorm.

    python benchmarks/gpu/check_train.py [--device cuda|cpu] [--model fat_b0] [--batch 128]
        [--img-size 224] [--steps 6] [--workdir DIR]

Everything is fatscale.train's own code: the recipe (recipes/fat_b0_300ep.yaml: bf16, AdamW,
gradient clipping, Mixup's soft-target loss), ``init_distributed`` (NCCL on a GPU, gloo on CPU),
``build_model``, ``deepspeed_config``, ``SafeCheckpointEngine``, ``build_loss``. Runs without DALI
(a placeholder stands in for it, common.dali_placeholder), so the first device call can run it.
Results:
  train_step      bf16 autocast logits, fp32 master weights, finite falling-or-steady loss; images/s
  checkpoint      saved and loaded into a fresh engine: every module and optimizer tensor and the
                  step counter equal bitwise; the next step gives the same loss on both
  syncbn_convert  build_model at world size 2 on a GPU converts every BatchNorm to SyncBatchNorm
  syncbn_kernels  torch's SyncBatchNorm function (its CUDA statistics kernels and the NCCL
                  all-gather, over the world of one) matches BatchNorm, output and gradients
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, dali_placeholder, result, single_rank_env  # noqa: E402

sys.path.insert(0, str(REPO))
import torch  # noqa: E402


def make_engine(recipe, device, seed: int):
    import deepspeed
    from fatscale.train import components as T
    from fatscale.train.checkpointer import SafeCheckpointEngine
    from timm.optim import create_optimizer_v2

    torch.manual_seed(seed)
    model = T.build_model(recipe, 1000, 1, device).to(device)
    o = recipe.optim
    optimizer = create_optimizer_v2(model, opt="adamw", lr=o.lr, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=T.deepspeed_config(recipe, 1))
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
    return engine


def batches(n: int, batch: int, size: int, device, seed: int = 0):
    """Fixed random images (channels_last, as the loader gives them) and soft targets (as Mixup gives)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 3, size, size, generator=g).to(device).contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, 1000, (batch,), generator=g)
        y = torch.full((batch, 1000), 0.1 / 1000)
        y[torch.arange(batch), labels] += 0.9
        out.append((x, y.to(device)))
    return out


def step(engine, loss_fn, x, y) -> float:
    loss = loss_fn(engine(x), y)
    engine.backward(loss)
    engine.step()
    return loss.item()


def state_tensors(engine) -> dict[str, torch.Tensor]:
    tensors = {f"module.{k}": v for k, v in engine.module.state_dict().items()}
    for i, (_, state) in enumerate(sorted(engine.optimizer.state_dict()["state"].items())):
        for key, value in state.items():
            tensors[f"optim.{i}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors


def check_train_and_checkpoint(args, recipe, device) -> None:
    from fatscale import checkpoint as ckpt
    from fatscale.train import components as T

    loss_fn = T.build_loss(recipe)
    data = batches(args.steps + 2, args.batch, args.img_size, device)
    engine = make_engine(recipe, device, seed=0)
    engine.train()
    with torch.no_grad():
        probe = engine(data[0][0][:2])
    master = {p.dtype for p in engine.module.parameters()}
    losses = [step(engine, loss_fn, *data[0])]  # warm-up (kernel selection) outside the timing
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    for x, y in data[1:args.steps]:
        losses.append(step(engine, loss_fn, x, y))
    sync()
    rate = args.batch * (args.steps - 1) / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    import torch.distributed as dist

    backend = dist.get_backend()
    want_backend = "nccl" if device.type == "cuda" else "gloo"
    want_dtype = torch.bfloat16
    ok = (probe.dtype == want_dtype and master == {torch.float32} and backend == want_backend
          and all(map(lambda v: v == v and abs(v) < 1e4, losses)) and engine.global_steps == args.steps)
    result("train_step", ok, f"{rate:.1f} img/s (batch {args.batch}, {args.img_size}px, eager, DeepSpeed + {backend}, "
           f"logits {str(probe.dtype).replace('torch.', '')}, master {'/'.join(sorted(str(d).replace('torch.', '') for d in master))}, "
           f"peak {peak:.1f} GiB) losses {' '.join(f'{v:.3f}' for v in losses)}",
           images_per_s=rate, losses=losses, backend=backend, peak_gib=peak)

    # Checkpoint round trip, as fatscale's trainer saves (DeepSpeed's files + COMPLETE + latest).
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fatscale-ckpt-"))
    checkpoint_dir = work / "checkpoints"
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    tag = ckpt.tag_for(engine.global_steps)
    start = time.perf_counter()
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, save_latest=False)
    ckpt.mark_complete(checkpoint_dir, tag, False)
    saved_s = time.perf_counter() - start
    before = {k: v.detach().clone() for k, v in state_tensors(engine).items()}
    fresh = make_engine(recipe, device, seed=1)  # other initial weights: the load must replace them
    start = time.perf_counter()
    fresh.load_checkpoint(str(checkpoint_dir), tag=ckpt.latest_tag(checkpoint_dir))
    loaded_s = time.perf_counter() - start
    after = state_tensors(fresh)
    differ = [k for k in before if k not in after or not torch.equal(before[k].cpu(), after[k].cpu())]
    differ += [k for k in after if k not in before]
    x, y = data[args.steps]
    engine.eval(), fresh.eval()
    with torch.no_grad():
        same_output = torch.equal(engine(x), fresh(x))
    engine.train(), fresh.train()
    torch.manual_seed(7)  # drop path draws from torch's generator: the same draws for both
    a = step(engine, loss_fn, x, y)
    torch.manual_seed(7)
    b = step(fresh, loss_fn, x, y)
    ok = not differ and fresh.global_steps == engine.global_steps and same_output and abs(a - b) <= 1e-3 * max(1, abs(a))
    result("checkpoint", ok, f"{len(before)} tensors equal after load ({len(differ)} differ{': ' + ', '.join(differ[:3]) if differ else ''}); "
           f"eval output {'bitwise equal' if same_output else 'DIFFERS'}; next-step loss {a:.5f} vs {b:.5f}; "
           f"save {saved_s:.2f} s, load {loaded_s:.2f} s (weights_only)", differ=differ[:20])


def check_syncbn(recipe, device) -> None:
    from fatscale.train import components as T

    plain = T.build_model(recipe, 1000, 1, device)
    bns = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in plain.modules())
    converted = T.build_model(recipe, 1000, 2, device)  # world size 2: the trainer's sync_bn branch
    syncs = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())
    if device.type != "cuda":
        result("syncbn_convert", "SKIP", f"no GPU: the trainer keeps {bns} BatchNorm layers per rank ({syncs} converted)")
        result("syncbn_kernels", "SKIP", "no GPU")
        return
    result("syncbn_convert", syncs == bns > 0, f"{syncs}/{bns} BatchNorm layers -> SyncBatchNorm")

    import torch.distributed as dist
    from torch.nn.modules._functions import SyncBatchNorm as SyncBatchNormFunction

    torch.manual_seed(0)
    channels = 64
    x = torch.randn(32, channels, 28, 28, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(channels, device=device).requires_grad_()
    bias = torch.randn(channels, device=device).requires_grad_()
    stats = [torch.zeros(channels, device=device), torch.ones(channels, device=device)]
    ref_stats = [s.clone() for s in stats]
    out = SyncBatchNormFunction.apply(x, weight, bias, stats[0], stats[1], 1e-5, 0.1, dist.group.WORLD, dist.get_world_size())
    grad = torch.randn_like(out)
    gx, gw, gb = torch.autograd.grad(out, (x, weight, bias), grad)
    ref = torch.nn.functional.batch_norm(x, ref_stats[0], ref_stats[1], weight, bias, True, 0.1, 1e-5)
    rx, rw, rb = torch.autograd.grad(ref, (x, weight, bias), grad)

    def rel(a, b):
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

    errors = dict(out=rel(out, ref), dx=rel(gx, rx), dw=rel(gw, rw), db=rel(gb, rb),
                  running_mean=rel(stats[0], ref_stats[0]), running_var=rel(stats[1], ref_stats[1]))
    result("syncbn_kernels", max(errors.values()) < 1e-4,
           "SyncBatchNorm function vs batch_norm, relative errors " + " ".join(f"{k} {v:.1e}" for k, v in errors.items()),
           errors=errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="fat_b0")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--workdir", help="where the checkpoint goes (default: a new temporary folder)")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2")
    placeholder = dali_placeholder()
    if placeholder:
        print("check_train: DALI is not installed yet: a placeholder stands in for it (no loader is built)")
    single_rank_env(args.device)
    from fatscale.config import load_recipe
    from fatscale.train.distributed import init_distributed

    recipe = load_recipe(REPO / "recipes" / "fat_b0_300ep.yaml",
                         [f"model.name={args.model}", f"train.batch_per_device={args.batch}", f"data.img_size={args.img_size}"],
                         check_shards=False)
    _rank, _world, _local, device = init_distributed()
    if args.device == "cuda" and device.type != "cuda":
        result("train_step", False, "asked for cuda, but torch sees no GPU")
        sys.exit(1)
    try:
        check_train_and_checkpoint(args, recipe, device)
        check_syncbn(recipe, device)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
