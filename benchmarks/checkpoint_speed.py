"""Cost of the checkpoint seal: Checkpointer.save of FAT-B0..B3 (module + AdamW state + EMA, one
gloo rank, DeepSpeed, bf16 autocast config, ZeRO 0) with every file hashed right after it is
written (SHA-256, read back from the page cache) against the same save without hashing (no
read-back, no-op digest), interleaved in the same run; and the resume-time check
(resume.intact_checkpoint: every file read back and hashed), page cache warm.

    python benchmarks/checkpoint_speed.py [--models fat_b0 fat_b3] [--repeats 5]
"""

import argparse
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class NoHash:
    def update(self, data) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


class NoHashlib:
    """hashlib for fatscale.checkpoint with the hashing taken out (the baseline)."""

    new = staticmethod(lambda name, data=b"": NoHash())
    file_digest = staticmethod(lambda file, name: NoHash())  # nothing read back


class StubLoader:
    def state_dict(self) -> dict:
        return {"position": 0}


def engine_for(name: str):
    import deepspeed
    import timm
    import torch
    from timm.optim import create_optimizer_v2

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=1000)
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    config = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 0}, "steps_per_print": 10**9, "timers": {"throughput": {"enabled": False}},
              "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    loss = engine(torch.randn(2, 3, 64, 64)).sum()
    engine.backward(loss)
    engine.step()  # AdamW's moments exist
    return engine, copy.deepcopy(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["fat_b0", "fat_b3"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where to save (default: a temporary directory)")
    args = parser.parse_args()
    os.environ.update(DS_ACCELERATOR="cpu", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
    import fatscale  # noqa: F401 (first: registers the models, and timm's torchvision imports after it)
    import deepspeed

    from fatscale.checkpoint import layout as ckpt
    from fatscale.config import CheckpointConfig
    from fatscale.checkpoint.resume import intact_checkpoint
    from fatscale.checkpoint.checkpointer import Checkpointer
    from fatscale.checkpoint.state import TrainState

    deepspeed.init_distributed(dist_backend="gloo")
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="checkpoint-speed-"))
    real_hashlib = ckpt.hashlib
    print(f"hash {ckpt.HASH}; {args.repeats} saves each, interleaved; median")
    print("| model | checkpoint MB | save, no hash | save, SHA-256 | cost | cost/save | verify at resume |")
    print("|---|---|---|---|---|---|---|")
    try:
        for name in args.models:
            engine, ema = engine_for(name)
            times = {"plain": [], "hashed": []}
            state = TrainState()
            checkpointer = Checkpointer(CheckpointConfig(keep_last=1), root / name, 0, engine=engine, state=state,
                                        loader=StubLoader(), identity={}, ema=ema)
            for _ in range(args.repeats):
                for kind in ("plain", "hashed"):
                    ckpt.hashlib = NoHashlib if kind == "plain" else real_hashlib
                    state.global_step += 1
                    start = time.perf_counter()
                    folder = checkpointer.save()
                    times[kind].append(time.perf_counter() - start)
            ckpt.hashlib = real_hashlib
            size = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
            verify = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                assert intact_checkpoint(root / name) == folder.name
                verify.append(time.perf_counter() - start)
            plain, hashed = statistics.median(times["plain"]), statistics.median(times["hashed"])
            print(f"| {name} | {size:.0f} | {plain * 1e3:.0f} ms | {hashed * 1e3:.0f} ms | {(hashed - plain) * 1e3:+.0f} ms "
                  f"| {(hashed - plain) / plain:+.0%} | {statistics.median(verify) * 1e3:.0f} ms "
                  f"({size / 1e3 / statistics.median(verify):.2f} GB/s) |", flush=True)
            shutil.rmtree(root / name)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
