"""fatscale: train the FAT vision backbones at cluster scale.

``import fatscale`` registers fat_b0..fat_b3 with timm (``timm.create_model("fat_b0")``).
"""

from fatscale._torchvision_compat import ensure_torchvision_importable

# Before anything imports timm (which imports torchvision).
ensure_torchvision_importable()

from fatscale import models  # noqa: E402,F401  (registers the models with timm)

__version__ = "0.1.0"
