"""Export a checkpoint's weights (raw and EMA) as timm model folders, and load them back from MLflow.

    python -m fatscale.export OUTPUT_DIR [--tag step-000001200] [--out DIR]

Writes ``model/`` and (when the run keeps an EMA) ``model_ema/``, default under
``OUTPUT_DIR/export``: each a folder in timm's own format, ``model.safetensors`` (fp32,
consolidated: ZeRO 0-2 keep whole parameters in the module states file) and ``config.json``
(architecture, ``num_classes``, the model arguments such as ``bidirectional``, the class names and
the input size and crop of the recipe), written by ``timm.models.save_for_hf``. timm builds the
trained model from a folder alone::

    timm.create_model("local-dir:outputs/run/export/model_ema", pretrained=True)

The trainer logs both folders to MLflow as logged models and registers them (fatscale.tracking);
``load_mlflow_model("models:/NAME/VERSION")`` builds the model from the registry. Nothing is
unpickled, neither from the checkpoint nor from MLflow. A checkpoint whose files do not match its
seal (fatscale.checkpoint) is refused with one line naming the file.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

import fatscale
from fatscale.checkpoint import layout as ckpt
from fatscale.data.manifest import ManifestError, load_manifest
from fatscale.tracking.runs import download_model

if TYPE_CHECKING:  # torch and timm are imported where used: --help answers at once
    import torch

WEIGHTS = "model.safetensors"  # the names timm's local-dir loader looks for
CONFIG = "config.json"
FLAVOR = "fatscale"  # the MLmodel flavor of fatscale's MLflow models


def export(output_dir: Path, tag: str | None = None, out: Path | None = None) -> list[Path]:
    """The folders written (raw first, then EMA), from checkpoint ``tag`` (default: the latest),
    which must match its seal (fatscale.checkpoint)."""
    checkpoint_dir = output_dir / "checkpoints"
    tag = tag or ckpt.latest_tag(checkpoint_dir)
    if tag is None:
        raise FileNotFoundError(f"{checkpoint_dir}: no complete checkpoint")
    verdict = ckpt.verify(checkpoint_dir, tag)
    if not verdict.good:
        raise RuntimeError(f"{verdict.damage}: not exported; python -m fatscale.checkpoint verify {output_dir} "
                           f"lists the intact checkpoints (export one with --tag)")
    recipe = yaml.safe_load(ckpt.read_json(checkpoint_dir / tag / "progress.json")["recipe"])
    out = out or output_dir / "export"
    weights = {"model": ckpt.module_state_dict(checkpoint_dir, tag)}
    if (checkpoint_dir / tag / "ema.safetensors").exists():
        weights["model_ema"] = ckpt.load_ema(checkpoint_dir, tag)
    written = []
    for name, state in weights.items():
        folder = out / name
        _save_timm_folder(recipe, state, folder)
        written.append(folder)
    return written


def _save_timm_folder(recipe: dict, state: dict[str, torch.Tensor], folder: Path) -> None:
    import timm

    data, bidirectional = recipe["data"], recipe["model"]["bidirectional"]
    # The config's input size, crop and interpolation are the model's pretrained_cfg: the recipe's.
    model = timm.create_model(recipe["model"]["name"], num_classes=state["head.weight"].shape[0],
                              bidirectional=bidirectional,
                              pretrained_cfg_overlay=dict(input_size=(3, data["img_size"], data["img_size"]),
                                                          crop_pct=data["crop_pct"], interpolation="bicubic"))
    model.load_state_dict(state, strict=True)
    model_config = {}
    try:
        manifest = load_manifest(data["shards"])
        model_config = dict(label_names=manifest.classes,
                            label_descriptions=dict(zip(manifest.classes, manifest.class_names)))
    except ManifestError:
        pass  # exported away from its shards: the folder then names no classes
    folder.mkdir(parents=True, exist_ok=True)
    # timm writes its files in place: write into a fresh sibling, then move them in.
    staging = folder.with_name(f".{folder.name}.tmp")
    timm.models.save_for_hf(model, str(staging), model_config=model_config, model_args=dict(bidirectional=bidirectional),
                            safe_serialization=True)
    for file in (WEIGHTS, CONFIG):
        (staging / file).replace(folder / file)
    staging.rmdir()


def mlflow_flavors(model_name: str) -> dict[str, dict[str, str]]:
    """The flavors of an exported folder's MLmodel file: what built it and how to load it."""
    return {FLAVOR: dict(model=model_name, weights=WEIGHTS, config=CONFIG, loader="fatscale.export.load_mlflow_model",
                         fatscale_version=fatscale.__version__, timm_version=metadata.version("timm"))}


def load_mlflow_model(model_uri: str, dst_path: str | None = None) -> torch.nn.Module:
    """The timm model (eval mode) of a fatscale MLflow model: ``models:/NAME/VERSION``,
    ``models:/NAME@ALIAS``, ``models:/MODEL_ID``, or any artifact URI of one, from the tracking and
    registry URIs MLflow is set to (``MLFLOW_TRACKING_URI`` or ``mlflow.set_tracking_uri``), as
    MLflow's own ``load_model`` functions do. Its files are downloaded (to ``dst_path``, default a
    temporary directory); the weights load from safetensors."""
    import timm

    local, flavors = download_model(model_uri, dst_path)
    if FLAVOR not in flavors:
        raise ValueError(f"{model_uri} is not a fatscale model: its MLmodel has the flavors {sorted(flavors)}, "
                         f"not {FLAVOR!r}")
    return timm.create_model(f"local-dir:{local}", pretrained=True).eval()


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
