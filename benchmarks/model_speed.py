"""Training-step and inference throughput of FAT-B0..B3 against the release's attention path.

    python benchmarks/model_speed.py [--models fat_b0 ...] [--batch 32] [--img-size 224]
        [--dtype fp32|bf16] [--channels-last] [--compile] [--device cpu|cuda] [--iters 10]

Baseline, measured in the same run: the same model with the release's global branch (explicit
softmax(q k^T) v with its reshapes and .contiguous() copies) in eager mode. Compared with it:
fatscale's FASA (scaled_dot_product_attention) in eager mode and, with --compile, under
torch.compile. A training step is forward + cross-entropy backward + AdamW step.
"""

import argparse
import contextlib
import math
import time
import types

import torch
import torch.nn.functional as F

import fatscale  # noqa: F401  (registers the FAT models with timm)
from fatscale.models.fat import FASA
import timm


def release_fasa_forward(self: FASA, x: torch.Tensor) -> torch.Tensor:
    """The official release's FASA.forward (explicit attention), for the baseline."""
    b, c, h, w = x.size()
    head_dim = c // self.num_heads
    q_local = self.q(x)
    q = q_local.reshape(b, -1, head_dim, h * w).transpose(-1, -2).contiguous()
    pooled = self.pool(x)
    hw_pooled = pooled.shape[-2] * pooled.shape[-1]
    k, v = self.kv(pooled).reshape(b, 2, -1, head_dim, hw_pooled).permute(1, 0, 2, 4, 3).contiguous()
    attn = torch.softmax(head_dim**-0.5 * q @ k.transpose(-1, -2), -1)
    global_feat = (attn @ v).transpose(-1, -2).reshape(b, c, h, w)
    local_feat = self.local_mixer(q_local)
    local_feat = local_feat * torch.sigmoid(local_feat)
    local_feat = local_feat * torch.sigmoid(global_feat)
    return self.mixer(local_feat * global_feat)


def build(name: str, baseline: bool, args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name).to(args.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if baseline:
        for module in model.modules():
            if isinstance(module, FASA):
                module.forward = types.MethodType(release_fasa_forward, module)
    return model


def throughput(model: torch.nn.Module, train: bool, args: argparse.Namespace) -> float:
    """Images/s over args.iters steps after args.warmup steps."""
    batch = args.batch if train else args.infer_batch
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, args.img_size, args.img_size, device=args.device).to(memory_format=memory_format)
    y = torch.randint(0, 1000, (batch,), device=args.device)
    autocast = (
        torch.autocast(args.device, dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext()
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train(train)

    def step() -> None:
        if train:
            with autocast:
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            with torch.no_grad(), autocast:
                model(x)

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    sync()
    return batch * args.iters / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["fat_b0", "fat_b1", "fat_b2", "fat_b3"])
    parser.add_argument("--batch", type=int, default=32, help="training batch")
    parser.add_argument("--infer-batch", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    print(
        f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"batch={args.batch}/{args.infer_batch} img={args.img_size} dtype={args.dtype} "
        f"channels_last={args.channels_last}"
    )
    variants = [("release attention, eager (baseline)", True, False), ("fatscale SDPA, eager", False, False)]
    if args.compile:
        variants.append(("fatscale SDPA, torch.compile", False, True))
    for name in args.models:
        for train in (True, False):
            baseline_rate = math.nan
            for label, baseline, compiled in variants:
                model = build(name, baseline, args)
                runner = torch.compile(model, fullgraph=True) if compiled else model
                if args.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                rate = throughput(runner, train, args)
                if baseline:
                    baseline_rate = rate
                memory = (
                    f"  peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if args.device == "cuda" else ""
                )
                print(
                    f"{name} {'train' if train else 'infer'}  {label:38} {rate:9.1f} img/s"
                    f"  x{rate / baseline_rate:.2f}{memory}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
