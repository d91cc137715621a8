"""Trained weights from wherever they are (a SOURCE), for fine-tuning (``model.init_from``) and
evaluation (``python -m fatscale.evaluate``). A SOURCE is one of:

- a run's output directory: its newest checkpoint that verifies (fatscale.checkpoint);
- one checkpoint directory (``OUTPUT_DIR/checkpoints/step-000001200``), which must verify;
- an exported timm folder (``OUTPUT_DIR/export/model_ema``: ``model.safetensors`` + ``config.json``);
- a ``.safetensors`` file, or a state-dict file (``.pt``/``.pth``/``.bin``: ``torch.load`` with
  ``weights_only=True``; a ``{"model": ...}``/``{"state_dict": ...}`` wrapper, as the official FAT
  release ships, is unwrapped);
- an MLflow registry URI, ``models:/NAME/VERSION`` (or ``@ALIAS``), of a fatscale logged model.

Nothing is unpickled as code. Checkpoints and output directories carry a raw and an EMA set
(``ema=True`` picks the EMA). Every failure is a :class:`SourceError` with a one-line message
naming the source and what is wrong, raised before any model is trained or evaluated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from fatscale.checkpoint import layout as ckpt
from fatscale.tracking import runs
from fatscale.tracking.uri import tracking_uri

if TYPE_CHECKING:  # torch, timm and MLflow are imported where used
    import torch

HEAD = ("head.weight", "head.bias")  # the classifier: re-initialised when the number of classes differs
STATE_DICT_WRAPPERS = ("model", "state_dict", "module", "model_ema")


class SourceError(ValueError):
    """A SOURCE that cannot give weights (one line)."""


@dataclass(frozen=True)
class Weights:
    state_dict: dict[str, torch.Tensor]  # fp32
    model_name: str | None  # the architecture the source names (None: a bare weights file)
    label: str  # "model" or "model_ema", as training names them (val/top1, val/top1_ema)
    description: str  # where they come from, for logs
    model_args: dict = field(default_factory=dict)  # e.g. bidirectional, as the source records them
    run_id: str | None = None  # the MLflow run that made them, when known
    tracking_uri: str | None = None  # where that run lives, when known
    recipe: dict | None = None  # the recipe that trained them (output and checkpoint directories)
    pretrained_cfg: dict | None = None  # a timm folder's (config.json): the input size and crop it was exported for


def load_weights(source: str, ema: bool = False, tracking_uri: str | None = None) -> Weights:
    """One set of weights from ``source`` (the EMA's with ``ema`` where the source has both); a
    registry URI is looked up at ``tracking_uri`` (default: MLflow's, e.g. ``MLFLOW_TRACKING_URI``)."""
    if source.startswith("models:/"):
        return _from_registry(source, tracking_uri)
    path = Path(source)
    if not path.exists():
        raise SourceError(f"{source}: no such file or directory")
    if (path / "checkpoints").is_dir():
        return _from_output_dir(path, ema)
    if (path / ckpt.COMPLETE).exists() or (path / "progress.json").exists():
        return _from_checkpoint(path.parent, path.name, ema)
    if (path / "config.json").exists():  # fatscale exports model/ and model_ema/
        return _from_timm_folder(path, source, "model_ema" if path.name.endswith("_ema") else "model")
    if path.is_file():
        return _from_file(path)
    raise SourceError(f"{source}: neither a run's output directory, a checkpoint, an exported timm folder nor a "
                      f"weights file")


def weights_to_evaluate(source: str) -> list[Weights]:
    """Every set ``source`` holds: the raw and the EMA weights of a run or checkpoint that keeps an
    EMA, else the one."""
    first = load_weights(source)
    if first.recipe is None or not first.recipe.get("ema", {}).get("enabled", True):
        return [first]
    return [first, load_weights(source, ema=True)]


def build_model(weights: Weights, model_name: str | None = None, num_classes: int | None = None,
                **model_args) -> torch.nn.Module:
    """The timm model ``model_name`` (default: the source's) with ``weights`` loaded strictly,
    except the classifier when ``num_classes`` differs from the source's: it keeps its fresh
    initialisation. Raises :class:`SourceError` for weights of another architecture and for any
    other missing or unexpected key."""
    import timm

    import fatscale  # noqa: F401  (registers the FAT models with timm)

    name = model_name or weights.model_name
    if name is None:
        raise SourceError(f"{weights.description}: the file names no architecture: give the model's name")
    source_classes = weights.state_dict["head.weight"].shape[0] if "head.weight" in weights.state_dict else None
    model = timm.create_model(name, num_classes=num_classes or source_classes or 1000,
                              pretrained_cfg_overlay=weights.pretrained_cfg, **{**weights.model_args, **model_args})
    load_into(model, name, weights)
    return model.eval()


def init_from(recipe) -> Weights:
    """The weights a fine-tuning recipe starts from (``model.init_from``; a registry URI is looked
    up at the recipe's tracking server)."""
    m, output_dir = recipe.model, recipe.output_dir
    return load_weights(m.init_from, m.init_from_ema, tracking_uri(recipe.tracking.uri, output_dir))


def check_init_from(recipe) -> None:
    """Pre-flight of a fine-tuning recipe: its ``init_from`` weights load into its model, the
    classifier aside; :class:`SourceError` if not."""
    import timm

    import fatscale  # noqa: F401  (registers the FAT models with timm)

    m = recipe.model
    load_into(timm.create_model(m.name, bidirectional=m.bidirectional), m.name, init_from(recipe))


def load_into(model: torch.nn.Module, model_name: str, weights: Weights) -> bool:
    """Loads ``weights`` into ``model`` (a ``model_name``): every key must match in name and shape,
    except the classifier's, which is skipped (the model's own stays) when its shape differs (another
    number of classes). Returns whether the head was skipped."""
    if weights.model_name is not None and weights.model_name != model_name:
        raise SourceError(f"{weights.description} holds {weights.model_name} weights, not {model_name}")
    state, own = weights.state_dict, model.state_dict()
    unexpected = sorted(state.keys() - own.keys())
    missing = sorted(own.keys() - state.keys())
    if unexpected or missing:
        what = f"unexpected key {unexpected[0]}" if unexpected else f"missing key {missing[0]}"
        more = len(unexpected) + len(missing) - 1
        raise SourceError(f"{weights.description}: {what}{f' (and {more} more)' if more else ''}: not weights of this "
                          f"architecture ({type(model).__name__} with {len(own)} tensors)")
    skip_head = any(key in state and state[key].shape != own[key].shape for key in HEAD)
    for key, value in state.items():
        if key not in HEAD and value.shape != own[key].shape:
            raise SourceError(f"{weights.description}: {key} has shape {tuple(value.shape)}, this model's "
                              f"{tuple(own[key].shape)}: weights of another architecture or size")
    model.load_state_dict({k: v for k, v in state.items() if not (skip_head and k in HEAD)}, strict=not skip_head)
    return skip_head


# ------------------------------------------------------------------ the kinds of source


def _from_output_dir(output_dir: Path, ema: bool) -> Weights:
    from fatscale.checkpoint.resume import NoIntactCheckpoint, intact_checkpoint

    checkpoint_dir = output_dir / "checkpoints"
    try:
        tag = intact_checkpoint(checkpoint_dir)
    except NoIntactCheckpoint as e:
        raise SourceError(str(e)) from None
    if tag is None:
        raise SourceError(f"{output_dir}: no checkpoint yet in {checkpoint_dir}")
    return _read_checkpoint(checkpoint_dir, tag, ema)


def _from_checkpoint(checkpoint_dir: Path, tag: str, ema: bool) -> Weights:
    verdict = ckpt.verify(checkpoint_dir, tag)
    if not verdict.good:
        raise SourceError(f"{verdict.damage}: not used")
    return _read_checkpoint(checkpoint_dir, tag, ema)


def _read_checkpoint(checkpoint_dir: Path, tag: str, ema: bool) -> Weights:
    progress = ckpt.read_json(checkpoint_dir / tag / "progress.json")
    recipe = yaml.safe_load(progress["recipe"])
    if ema and not (checkpoint_dir / tag / "ema.safetensors").exists():
        raise SourceError(f"{checkpoint_dir / tag}: the run kept no EMA weights (ema.enabled: false)")
    state = ckpt.load_ema(checkpoint_dir, tag) if ema else ckpt.module_state_dict(checkpoint_dir, tag)
    model = recipe["model"]
    return Weights({k: v.float() for k, v in state.items()}, model["name"], "model_ema" if ema else "model",
                   f"{checkpoint_dir / tag}{' (EMA)' if ema else ''}",
                   model_args=dict(bidirectional=model["bidirectional"],
                                   norm_keeps_format=model.get("norm_keeps_format", True)),
                   run_id=progress.get("mlflow_run_id"),
                   tracking_uri=tracking_uri(recipe["tracking"]["uri"], str(checkpoint_dir.parent)), recipe=recipe)


def _from_timm_folder(folder: Path, source: str, label: str, run_id: str | None = None,
                      tracking_uri: str | None = None) -> Weights:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        config = json.loads((folder / "config.json").read_text())
        name = config["architecture"]
        state = load_file(str(folder / "model.safetensors"))
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise SourceError(f"{source}: not a readable timm folder ({type(e).__name__}: {e})") from None
    return Weights({k: v.float() for k, v in state.items()}, name, label, source,
                   model_args={k: v for k, v in config.get("model_args", {}).items() if k == "bidirectional"},
                   run_id=run_id, tracking_uri=tracking_uri, pretrained_cfg=config.get("pretrained_cfg"))


def _from_file(path: Path) -> Weights:
    import torch

    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (OSError, SafetensorError) as e:
            raise SourceError(f"{path}: not a readable safetensors file ({e})") from None
    else:
        try:  # weights_only: tensors and plain containers; any other pickled object is refused, never run
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
            raise SourceError(f"{path}: not a state dict loadable without running code ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
        for wrapper in STATE_DICT_WRAPPERS:
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise SourceError(f"{path}: not a state dict (a mapping of names to tensors)")
    return Weights({k.removeprefix("module."): v.float() for k, v in state.items()}, None, "model", str(path))


def _from_registry(uri: str, tracking_uri: str | None) -> Weights:
    tracking_uri = tracking_uri or runs.default_tracking_uri()
    try:
        version = runs.download_model_version(uri, tracking_uri)
    except runs.MlflowError as e:
        raise SourceError(f"{uri}: {e} (tracking URI {tracking_uri})") from None
    # fatscale registers a run's models as <run>-<model> and <run>-<model>-ema (fatscale.train.reporting)
    return _from_timm_folder(version.path, uri, "model_ema" if version.name.endswith("-ema") else "model",
                             version.run_id, tracking_uri)
