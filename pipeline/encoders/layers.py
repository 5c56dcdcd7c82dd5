"""Network pieces that zoo models need beside timm's own layers.

``ConvStem``: CTransPath's patch embedding (Wang et al., "Transformer-based unsupervised
contrastive learning for histopathological image classification", Medical Image Analysis
2022): two stride-2 3x3 convolutions with batch norm and ReLU, then a 1x1 projection, in
place of Swin's 4x4 patchify convolution. Its parameter names (``proj.0`` ... ``proj.6``,
``norm``) are those of the published checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class ConvStem(nn.Module):
    """Images ``B x 3 x H x W`` -> patch embeddings ``B x H/4 x W/4 x D`` (NHWC, as timm's
    Swin wants them), built with the keyword arguments timm passes to a Swin embed layer."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        norm_layer: Callable[[int], nn.Module] | None = None,
        output_fmt: str = "NHWC",
        **_: object,  # strict_img_size, device, dtype: the stem has no fixed grid
    ):
        super().__init__()
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        patch = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        if patch != (4, 4) or embed_dim % 8 or output_fmt != "NHWC":
            raise ValueError(
                f"ConvStem takes patch size 4, an embed dim divisible by 8 and NHWC output, "
                f"not {patch}, {embed_dim}, {output_fmt}"
            )
        self.img_size, self.patch_size = size, patch
        self.grid_size = (size[0] // 4, size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[nn.Module] = []
        width_in, width = in_chans, embed_dim // 8
        for _stage in range(2):  # each halves the side: 4x in all
            layers += [
                nn.Conv2d(width_in, width, kernel_size=3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            width_in, width = width, width * 2
        layers.append(nn.Conv2d(width_in, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # B x D x H/4 x W/4
        return self.norm(x.permute(0, 2, 3, 1))  # B x H/4 x W/4 x D


def swin_v1_state(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A Swin checkpoint of timm <= 0.5 (CTransPath's; ``{"model": ...}`` unwrapped by
    :func:`pipeline.encoders.core.read_state_dict`) in today's timm layout: timm's own
    converter moves each stage's closing ``downsample`` to the start of the next stage and
    drops the ``relative_position_index`` and ``attn_mask`` buffers."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn(state, model)
