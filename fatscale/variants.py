"""The FAT variants fatscale registers with timm, as plain data: their names and official
configurations (classification/configs/FAT_b*.yaml of the release). Importable without torch or
timm, so that a recipe's ``model.name`` is checked without them (fatscale.config);
fatscale.models.fat builds the models from this table.
"""

ARCHS = {
    "fat_b0": dict(embed_dims=(32, 80, 160, 256), depths=(2, 2, 6, 2), num_heads=(2, 5, 10, 16), drop_path_rate=0.05),
    "fat_b1": dict(embed_dims=(48, 96, 192, 384), depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.1),
    "fat_b2": dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 16), drop_path_rate=0.1),
    "fat_b3": dict(embed_dims=(64, 128, 256, 512), depths=(4, 4, 16, 4), num_heads=(2, 4, 8, 16), drop_path_rate=0.15),
}
VARIANTS = tuple(ARCHS)  # fat_b0 .. fat_b3
