"""train.deterministic on the GPU: three of the trainer's optimizer steps on FAT-B0 (eager, bf16,
batch 128, 224 px), run twice from the same seed and batches: bitwise the same weights, or not.

    python -m benchmarks.gpu.check_determinism --out DIR [--device cuda|cpu] [--tiny]

The Trainer turns torch.use_deterministic_algorithms on (train.deterministic: true); cuBLAS needs
CUBLAS_WORKSPACE_CONFIG=:4096:8 before CUDA starts, as fatscale's launchers set it (set here
unless set already). Results:
  determinism   every weight and EMA weight bitwise equal after the two runs, or how many tensors
                differ and by how much; an operation without a deterministic kernel fails the run
                and is named
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before torch starts CUDA

from benchmarks.gpu import data  # noqa: E402
from benchmarks.gpu import trainer_harness as harness  # noqa: E402
from benchmarks.gpu.common import check_main  # noqa: E402
from benchmarks.gpu.results import Results  # noqa: E402

STEPS = 3


def three_steps(args: argparse.Namespace, model: str) -> dict:
    """The weights (and the EMA's) after STEPS of a fresh deterministic Trainer, on the CPU."""
    size, batch, _ = harness.sizes(args.tiny)
    trainer = harness.build(model, args.device, args.tiny, args.work, ("train.deterministic=true",))
    harness.train_steps(trainer, data.batches(STEPS, batch, size, trainer.device))
    weights = {f"model.{k}": v.detach().cpu().clone() for k, v in trainer.engine.module.state_dict().items()}
    if trainer.ema is not None:
        weights.update({f"ema.{k}": v.detach().cpu().clone() for k, v in trainer.ema.module.state_dict().items()})
    harness.release(trainer)
    return weights


def run(args: argparse.Namespace, results: Results) -> None:
    model = args.models[0]
    first, second = three_steps(args, model), three_steps(args, model)
    differ = [k for k in first if not (first[k].shape == second[k].shape and first[k].equal(second[k]))]
    largest = max(((first[k].double() - second[k].double()).abs().max().item() for k in differ
                   if first[k].is_floating_point() and first[k].shape == second[k].shape), default=0.0)
    results("determinism", not differ, f"{model}, {STEPS} steps twice: "
            + (f"all {len(first)} tensors bitwise equal" if not differ else
               f"{len(differ)}/{len(first)} tensors differ (largest {largest:.2e}), e.g. {', '.join(differ[:3])}"),
            differ=differ[:20], largest=largest)


if __name__ == "__main__":
    check_main("determinism", __doc__, run)
