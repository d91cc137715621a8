"""fatscale: train the FAT vision backbones at cluster scale.

``import fatscale`` registers fat_b0..fat_b3 with timm (``timm.create_model("fat_b0")``), cheaply:
at once if timm is imported already, else the moment it is (fatscale._timm_hook), so command lines
that never touch a model do not wait for timm, torch and torchvision to import.
"""

from fatscale._timm_hook import register_when_timm_is_imported

register_when_timm_is_imported()

__version__ = "0.1.0"
