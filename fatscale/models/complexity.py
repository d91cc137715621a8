"""Parameters and MACs of the FAT variants next to the paper's figures.

    python -m fatscale.models.complexity [--img-size 224] [--models fat_b0 fat_b3]

MACs are counted by torch's FlopCounterMode (convolutions, matmuls and attention; norms and
element-wise ops are not counted, the usual convention behind papers' GFLOPs) and halved:
papers' "FLOPs" are multiply-accumulates.
"""

import argparse

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import timm

# NeurIPS 2023 paper, Table 1: (params in M, GFLOPs at 224x224).
PAPER = {"fat_b0": (4.5, 0.7), "fat_b1": (7.8, 1.2), "fat_b2": (13.5, 2.0), "fat_b3": (29.0, 4.4)}


def count_macs(model: torch.nn.Module, img_size: int) -> int:
    x = torch.zeros(1, 3, img_size, img_size)
    counter = FlopCounterMode(display=False)
    # The math backend decomposes attention into matmuls the counter sees on every device.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model.eval()(x)
    return counter.get_total_flops() // 2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--models", nargs="+", default=list(PAPER), choices=list(PAPER))
    args = parser.parse_args(argv)
    print(f"{'model':8} {'params (M)':>11} {'paper':>6} {'GMACs':>7} {'paper':>6}   at {args.img_size}x{args.img_size}")
    for name in args.models:
        model = timm.create_model(name)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        gmacs = count_macs(model, args.img_size) / 1e9
        paper_params, paper_gflops = PAPER[name]
        print(f"{name:8} {params:11.2f} {paper_params:6.1f} {gmacs:7.2f} {paper_gflops:6.1f}")


if __name__ == "__main__":
    main()
