"""Export a checkpoint's weights (raw and EMA) as safetensors that timm loads.

    python -m fatscale.export OUTPUT_DIR [--tag step-000001200] [--out DIR]

Writes ``model.safetensors`` and (when the run keeps an EMA) ``model_ema.safetensors``, fp32,
consolidated (ZeRO 0-2 keep whole parameters in the module states file), default into
``OUTPUT_DIR/export``. Load with ``timm.create_model(name, pretrained=True,
pretrained_cfg_overlay=dict(file=...))``. Nothing is unpickled from the checkpoint.
"""

import argparse
import sys
from pathlib import Path

from fatscale import checkpoint as ckpt


def export(output_dir: Path, tag: str | None = None, out: Path | None = None) -> list[Path]:
    checkpoint_dir = output_dir / "checkpoints"
    tag = tag or ckpt.latest_tag(checkpoint_dir)
    if tag is None:
        raise FileNotFoundError(f"{checkpoint_dir}: no complete checkpoint")
    out = out or output_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "model.safetensors"]
    ckpt.save_safetensors_atomic(ckpt.module_state_dict(checkpoint_dir, tag), written[0])
    if (checkpoint_dir / tag / "ema.safetensors").exists():
        written.append(out / "model_ema.safetensors")
        ckpt.save_safetensors_atomic(ckpt.load_ema(checkpoint_dir, tag), written[1])
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--tag")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    try:
        for path in export(args.output_dir, args.tag, args.out):
            print(path)
    except (FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
