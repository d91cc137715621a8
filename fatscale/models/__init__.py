"""Importing this package registers the FAT family with timm (``timm.create_model("fat_b0")``)."""

from fatscale.models.fat import FAT

__all__ = ["FAT"]
