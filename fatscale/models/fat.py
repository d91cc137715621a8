"""FAT: Fully Adaptive Transformer (Fan et al., "Lightweight Vision Transformer with
Bidirectional Interaction", NeurIPS 2023).

Functionally identical to the official release (github.com/qhfan/FAT), with the same state-dict
keys, so released checkpoints load with ``strict=True``. Differences, none of which changes the
function of a released model:
  * plain ``BatchNorm2d`` where the release hard-codes ``SyncBatchNorm`` (the trainer converts);
  * the global branch runs through ``F.scaled_dot_product_attention`` (flash / memory-efficient
    kernels on GPU) instead of an explicit softmax;
  * ``bidirectional=True`` offers the paper's interaction (see ``FASA``), off by default;
  * timm model API: ``forward_features``/``forward_head``, ``forward_intermediates`` and
    ``features_only``, per-stage activation checkpointing.
Weights keep PyTorch's default initialisation, as in the release.
"""

from functools import partial
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, GroupNorm1, register_notrace_function
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq

from fatscale.variants import ARCHS as _ARCHS  # the official configurations (torch-free: the recipe check reads them)

__all__ = ["FAT"]


def _dwconv(dim: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(dim, dim, kernel_size, stride, kernel_size // 2, groups=dim)


def _pwconv(in_dim: int, out_dim: int) -> nn.Conv2d:
    return nn.Conv2d(in_dim, out_dim, 1)


# A leaf for FX, to timm's tracer (register_notrace_function) and any other (torch.fx.wrap): a
# symbolic tensor has no strides to branch on. Traced graphs call it as it is, fast path included.
@register_notrace_function
def _unit_stride_last(x: torch.Tensor) -> torch.Tensor:
    # Attention kernels read head_dim vectors: from NCHW maps they are strided by H*W and SDPA
    # runs ~5x slower on CPU, so copy. From channels_last maps they are already dense: no copy.
    return x if x.stride(-1) == 1 else x.contiguous()


torch.fx.wrap("_unit_stride_last")


@register_notrace_function
def _group_norm1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    # Statistics in at least fp32, as autocast runs F.group_norm.
    if x.dtype == torch.float16 or x.dtype == torch.bfloat16:
        x = x.float()
    var, mean = torch.var_mean(x, dim=(1, 2, 3), correction=0, keepdim=True)
    scale = weight[:, None, None] * torch.rsqrt(var + eps)  # (B, C, 1, 1)
    return x * scale + (bias[:, None, None] - mean * scale)


torch.fx.wrap("_group_norm1")


class FormatKeepingGroupNorm1(nn.GroupNorm):
    """GroupNorm(1, C) whose output keeps the input's memory format. CUDA's group_norm makes its
    input contiguous (NCHW) in forward and backward: after timm's GroupNorm1 every block would run
    NCHW, with layout copies at each norm. Same parameters and state-dict keys as nn.GroupNorm."""

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__(1, num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _group_norm1(x, self.weight, self.bias, self.eps)


class ConvBnReLU(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_chs, out_chs, 3, stride, 1), nn.BatchNorm2d(out_chs), nn.ReLU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ConvStem(nn.Module):
    """Four 3x3 conv-BN-ReLU (two of stride 2) to H/4, a 1x1 conv and a GroupNorm(1, C)."""

    def __init__(self, in_chs: int, dim: int, norm_layer: Callable[[int], nn.Module] = GroupNorm1):
        super().__init__()
        self.conv1 = ConvBnReLU(in_chs, dim // 2, 2)
        self.conv2 = ConvBnReLU(dim // 2, dim, 2)
        self.conv3 = ConvBnReLU(dim, dim, 1)
        self.conv4 = ConvBnReLU(dim, dim, 1)
        self.conv5 = _pwconv(dim, dim)
        self.layernorm = norm_layer(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv4(self.conv3(self.conv2(self.conv1(x))))
        return self.layernorm(self.conv5(x))


def fine_grained_downsample(dim: int, window_size: int, kernel_size: int = 5) -> nn.Module:
    """log2(window) stride-2 depthwise conv + BN steps, with 1x1 convs between them."""
    if window_size == 1:
        return nn.Identity()
    steps = window_size.bit_length() - 1
    if 1 << steps != window_size:
        raise ValueError(f"window_size must be a power of two, got {window_size}")
    layers = nn.Sequential()
    for i in range(steps):
        layers.add_module(f"conv{i}", _dwconv(dim, kernel_size, 2))
        layers.add_module(f"bn{i}", nn.BatchNorm2d(dim))
        if i != steps - 1:
            layers.add_module(f"linear{i}", _pwconv(dim, dim))
    return layers


class FASA(nn.Module):
    """Fully adaptive self-attention: a global branch attending to a downsampled context and a
    self-modulated depthwise local branch, fused by local-global interaction.

    The release gates only the local branch by the global one:
        out = mixer(local * sigmoid(global) * global),   local = silu(dwconv(q)).
    The paper describes both directions; ``bidirectional=True`` also gates the global branch:
        out = mixer(local * sigmoid(global) * global * sigmoid(local)).
    Both forms have the same parameters.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int,
        num_heads: int,
        window_size: int,
        bidirectional: bool = False,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.bidirectional = bidirectional
        self.q = _pwconv(dim, dim)
        self.kv = _pwconv(dim, dim * 2)
        self.local_mixer = _dwconv(dim, kernel_size)
        self.mixer = _pwconv(dim, dim)
        self.pool = fine_grained_downsample(dim, window_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        head_dim = c // self.num_heads
        q_local = self.q(x)
        # Head-major channel split as in the release.
        q = q_local.reshape(b, self.num_heads, head_dim, h * w).transpose(-1, -2)
        kv = self.kv(self.pool(x)).reshape(b, 2, self.num_heads, head_dim, -1).transpose(-1, -2)
        k, v = kv.unbind(1)
        global_feat = F.scaled_dot_product_attention(  # scale = head_dim ** -0.5
            _unit_stride_last(q), _unit_stride_last(k), _unit_stride_last(v)
        )
        global_feat = global_feat.transpose(-1, -2).reshape(b, c, h, w)

        local_feat = F.silu(self.local_mixer(q_local))  # x * sigmoid(x): self-modulation
        gated_local = local_feat * torch.sigmoid(global_feat)
        if self.bidirectional:
            global_feat = global_feat * torch.sigmoid(local_feat)
        return self.mixer(gated_local * global_feat)


class ConvFFN(nn.Module):
    """1x1 -> GELU -> 5x5 depthwise (residual at stride 1, strided otherwise) -> BN -> 1x1."""

    def __init__(self, dim: int, hidden_dim: int, kernel_size: int, stride: int, out_dim: int):
        super().__init__()
        self.stride = stride
        self.fc1 = _pwconv(dim, hidden_dim)
        self.act = nn.GELU()
        self.dwconv = _dwconv(hidden_dim, kernel_size, stride)
        self.bn = nn.BatchNorm2d(hidden_dim)
        self.fc2 = _pwconv(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(x))
        x = x + self.dwconv(x) if self.stride == 1 else self.dwconv(x)
        return self.fc2(self.bn(x))


class FATBlock(nn.Module):
    """CPE + FASA + ConvFFN. A stride-2 block ends a stage: its ConvFFN downsamples and the
    shortcut becomes depthwise conv + BN + 1x1 (the release has no patch-merging layer)."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        kernel_size: int,
        num_heads: int,
        window_size: int,
        mlp_kernel_size: int,
        mlp_ratio: float,
        stride: int,
        drop_path: float = 0.0,
        bidirectional: bool = False,
        norm_layer: Callable[[int], nn.Module] = GroupNorm1,
    ):
        super().__init__()
        self.cpe = _dwconv(dim, kernel_size)
        self.norm1 = norm_layer(dim)
        self.attn = FASA(dim, kernel_size, num_heads, window_size, bidirectional)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        if stride == 1:
            self.downsample = nn.Identity()
        else:
            self.downsample = nn.Sequential(
                _dwconv(dim, mlp_kernel_size, stride), nn.BatchNorm2d(dim), _pwconv(dim, out_dim)
            )
        self.ffn = ConvFFN(dim, int(dim * mlp_ratio), mlp_kernel_size, stride, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.cpe(x)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return self.downsample(x) + self.drop_path(self.ffn(self.norm2(x)))


class FATStage(nn.Module):
    def __init__(
        self,
        depth: int,
        dim: int,
        out_dim: int,
        kernel_size: int,
        num_heads: int,
        window_size: int,
        mlp_kernel_size: int,
        mlp_ratio: float,
        drop_paths: Sequence[float],
        downsample: bool,
        bidirectional: bool = False,
        norm_layer: Callable[[int], nn.Module] = GroupNorm1,
    ):
        super().__init__()
        self.grad_checkpointing = False
        block = partial(
            FATBlock,
            kernel_size=kernel_size,
            num_heads=num_heads,
            window_size=window_size,
            mlp_kernel_size=mlp_kernel_size,
            mlp_ratio=mlp_ratio,
            bidirectional=bidirectional,
            norm_layer=norm_layer,
        )
        last = depth - 1
        self.blocks = nn.Sequential(
            *[
                block(
                    dim=dim,
                    out_dim=out_dim if i == last else dim,
                    stride=2 if downsample and i == last else 1,
                    drop_path=drop_paths[i],
                )
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class FAT(nn.Module):
    """Stem to H/4, four stages (each but the last ends with a stride-2 block that widens to the
    next stage's dim), GroupNorm + average pool + linear head.

    Feature taps for dense tasks (``forward_intermediates`` / ``features_only``), one per stride:
    0: stem (H/4, dims[0]), 1: after stage 0 (H/8, dims[1]), 2: after stage 1 (H/16, dims[2]),
    3: after stage 3 (H/32, dims[3]). Stage 2's output (also H/32) is not a tap.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (32, 80, 160, 256),
        depths: Sequence[int] = (2, 2, 6, 2),
        kernel_sizes: Sequence[int] = (3, 5, 7, 9),
        num_heads: Sequence[int] = (2, 5, 10, 16),
        window_sizes: Sequence[int] = (8, 4, 2, 1),
        mlp_kernel_sizes: Sequence[int] = (5, 5, 5, 5),
        mlp_ratios: Sequence[float] = (4, 4, 4, 4),
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        bidirectional: bool = False,
        norm_keeps_format: bool = True,
        global_pool: str = "avg",
    ):
        super().__init__()
        num_stages = len(depths)
        for name, values in dict(
            embed_dims=embed_dims,
            kernel_sizes=kernel_sizes,
            num_heads=num_heads,
            window_sizes=window_sizes,
            mlp_kernel_sizes=mlp_kernel_sizes,
            mlp_ratios=mlp_ratios,
        ).items():
            if len(values) != num_stages:
                raise ValueError(f"{name} has {len(values)} entries, depths has {num_stages}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = embed_dims[-1]

        # timm's GroupNorm1 (F.group_norm) or the same function keeping channels_last on GPUs.
        norm_layer = FormatKeepingGroupNorm1 if norm_keeps_format else GroupNorm1
        self.patch_embed = ConvStem(in_chans, embed_dims[0], norm_layer)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i in range(num_stages):
            last = i == num_stages - 1
            start = sum(depths[:i])
            self.layers.append(
                FATStage(
                    depth=depths[i],
                    dim=embed_dims[i],
                    out_dim=embed_dims[i] if last else embed_dims[i + 1],
                    kernel_size=kernel_sizes[i],
                    num_heads=num_heads[i],
                    window_size=window_sizes[i],
                    mlp_kernel_size=mlp_kernel_sizes[i],
                    mlp_ratio=mlp_ratios[i],
                    drop_paths=dpr[start : start + depths[i]],
                    downsample=not last,
                    bidirectional=bidirectional,
                    norm_layer=norm_layer,
                )
            )
        self.norm = norm_layer(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        # Taps: the stem, then each stage whose output has a new stride (stage n-2 and n-1 share
        # the last stride; the later one is taken). Entry = index in self.layers, -1 = stem.
        self._tap_after = [-1, *range(num_stages - 2), num_stages - 1]
        self.feature_info = []
        for after in self._tap_after:
            level = min(after + 1, num_stages - 1)
            module = "patch_embed" if after < 0 else f"layers.{after}"
            self.feature_info.append(dict(num_chs=embed_dims[level], reduction=4 << level, module=module))

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)" if coarse else [(r"^layers\.(\d+)\.blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True, stages: Optional[Sequence[int]] = None) -> None:
        """Recompute activations in backward, for all stages or only those listed."""
        for i, stage in enumerate(self.layers):
            if stages is None or i in stages:
                stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features at the taps in ``indices`` (see the class docstring); ``norm`` applies the
        final GroupNorm to the last tap."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self._tap_after), indices)
        last_tap = len(self._tap_after) - 1
        intermediates = []
        x = self.patch_embed(x)
        if 0 in take_indices:
            intermediates.append(x)
        num_layers = self._tap_after[max_index] + 1 if stop_early else len(self.layers)
        for i in range(num_layers):
            x = self.layers[i](x)
            if i in self._tap_after:
                tap = self._tap_after.index(i)
                if tap in take_indices:
                    intermediates.append(self.norm(x) if norm and tap == last_tap else x)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self,
        indices: Union[int, List[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self._tap_after), indices)
        keep = self._tap_after[max_index] + 1
        if keep < len(self.layers):
            self.layers = self.layers[:keep]
            self._tap_after = self._tap_after[: max_index + 1]
            prune_norm = True  # sized for the last stage only
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs) -> dict:
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.conv1.conv.0",
        "classifier": "head",
        "paper_ids": "arXiv:2306.00396",
        "paper_name": "Lightweight Vision Transformer with Bidirectional Interaction",
        "origin_url": "https://github.com/qhfan/FAT",
        **kwargs,
    }


# No hub weights: pass a file with pretrained_cfg_overlay=dict(file=...).
default_cfgs = generate_default_cfgs({f"fat_b{i}": _cfg() for i in range(4)})


def _create_fat(variant: str, pretrained: bool = False, **kwargs) -> FAT:
    model_args = dict(_ARCHS[variant], **kwargs)
    return build_model_with_cfg(
        FAT,
        variant,
        pretrained,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
        **model_args,
    )


@register_model
def fat_b0(pretrained: bool = False, **kwargs) -> FAT:
    return _create_fat("fat_b0", pretrained, **kwargs)


@register_model
def fat_b1(pretrained: bool = False, **kwargs) -> FAT:
    return _create_fat("fat_b1", pretrained, **kwargs)


@register_model
def fat_b2(pretrained: bool = False, **kwargs) -> FAT:
    return _create_fat("fat_b2", pretrained, **kwargs)


@register_model
def fat_b3(pretrained: bool = False, **kwargs) -> FAT:
    return _create_fat("fat_b3", pretrained, **kwargs)
