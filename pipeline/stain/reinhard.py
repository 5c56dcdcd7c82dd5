"""Reinhard colour normalization, batched.

Reinhard et al., "Color transfer between images", IEEE CG&A 2001: match the mean and
standard deviation of each CIE L*a*b* channel to the target's. As in torchstain and
StainTools the statistics are taken over all pixels of a tile (no tissue mask); tiles
that are (nearly) flat - blank glass - pass through unchanged.
"""

from __future__ import annotations

import torch

from pipeline.stain.base import StainNormalizer, register_stain_method
from pipeline.stain.color import lab_to_rgb, rgb_to_lab


@register_stain_method("reinhard")
class ReinhardNormalizer(StainNormalizer):
    """Reinhard normalizer (LAB mean/std transfer).

    Args:
        min_std: least L* standard deviation of a tile to be normalized (flat tiles pass).
    """

    def __init__(self, min_std: float = 1.0):
        super().__init__()
        self.min_std = min_std
        self.mean: torch.Tensor | None = None  # 3 target LAB means
        self.std: torch.Tensor | None = None  # 3 target LAB standard deviations

    @staticmethod
    def stats(lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = lab.flatten(2)  # B x 3 x N
        return flat.mean(dim=2), flat.std(dim=2)  # B x 3 each

    def fit_batch(self, target: torch.Tensor) -> None:
        mean, std = self.stats(rgb_to_lab(target))
        self.mean, self.std = mean[0], std[0]

    def normalize_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lab = rgb_to_lab(x)  # B x 3 x H x W
        mean, std = self.stats(lab)
        ok = std[:, 0] >= self.min_std
        scale = self.std.to(x) / std.clamp_min(1e-6)  # B x 3
        lab = (lab - mean[..., None, None]) * scale[..., None, None] + self.mean.to(x)[
            None, :, None, None
        ]
        return lab_to_rgb(lab), ok

    def state_dict(self) -> dict:
        if self.mean is None:
            return {}
        return {
            "mean": self.mean.cpu().tolist(),
            "std": self.std.cpu().tolist(),
            "min_std": self.min_std,
        }

    def load_state_dict(self, state: dict, device: str | torch.device = "cpu") -> None:
        self.mean = torch.tensor(state["mean"], dtype=torch.float32, device=device)
        self.std = torch.tensor(state["std"], dtype=torch.float32, device=device)
        self.min_std = state.get("min_std", self.min_std)
