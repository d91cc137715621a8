"""fatscale: train the FAT vision backbones at cluster scale."""

from fatscale._torchvision_compat import ensure_torchvision_importable

# Before anything imports timm (which imports torchvision).
ensure_torchvision_importable()

__version__ = "0.1.0"
