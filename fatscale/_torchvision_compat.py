"""Make torchvision (and with it timm) importable next to a CPU-only torch.

The registry's torchvision wheel is a CUDA build: its ``_C.so`` links ``libtorch_cuda.so``,
so with the CPU torch it fails to load, and ``import torchvision`` then dies in its meta
registrations with ``operator torchvision::nms does not exist``. Declaring the schemas of the
two ops those registrations expect lets torchvision import; its C++ ops (nms, io.decode_jpeg)
stay unavailable, and fatscale never calls them. Nothing is done when the real library loads.
"""

import glob
import importlib.util
import os

import torch

_schemas: torch.library.Library | None = None  # kept alive: the definitions die with it


def _torchvision_ops_load() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # no torchvision: nothing to repair
    libraries = glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so"))
    if not libraries:
        return False
    try:
        torch.ops.load_library(libraries[0])  # what torchvision itself does on import
    except OSError:
        return False
    return True


def ensure_torchvision_importable() -> None:
    global _schemas
    if _schemas is not None or _torchvision_ops_load():
        return
    _schemas = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        _schemas.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
