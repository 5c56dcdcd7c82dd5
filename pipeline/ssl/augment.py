"""The per-crop augmentations of pretraining that run on the training device, per batch.

DataLoader workers only read tiles and cut the multi-crop views (random resized crops and
dihedral turns, :class:`pipeline.ssl.data.MultiCrop`) and ship them as uint8: a quarter of
the host memory and transfer of float crops. On the device, every crop of the batch draws
its own parameters for what follows, in DINO's order (Caron et al., 2021): HED and HSV
stain jitter, Gaussian blur (kernel 9, sigma ~ U(0.1, 2.0), torchvision's kernel and
reflect padding), solarization of the second global crop, then conversion to float and
the encoder's mean/std.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.ssl.config import DataConfig
from pipeline.stain.augment import HEDJitter, HSVJitter

BLUR_KERNEL = 9
BLUR_SIGMA = (0.1, 2.0)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``B x C x H x W`` float images, each blurred with its own ``sigma`` (``B``): a
    separable 9-tap Gaussian with reflect padding, torchvision's ``gaussian_blur``."""
    b, c, h, w = images.shape
    half = BLUR_KERNEL // 2
    t = torch.arange(-half, half + 1, device=images.device, dtype=images.dtype)  # 9
    kernel = torch.exp(-0.5 * (t[None] / sigma[:, None].to(images.dtype)) ** 2)  # B x 9
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # BC x 9
    x = F.pad(images, (half, half, half, half), mode="reflect").reshape(1, b * c, h + 2 * half, -1)
    x = F.conv2d(x, kernel[:, None, None, :], groups=b * c)  # 1 x BC x H+8 x W
    x = F.conv2d(x, kernel[:, None, :, None], groups=b * c)  # 1 x BC x H x W
    return x.reshape(b, c, h, w)


class DeviceAugment:
    """uint8 crops ``N x 3 x S x S`` -> augmented, normalised float crops, on their device.

    Args:
        cfg: the data config (stain jitter ranges, blur and solarization probabilities,
            mean and std).
    """

    def __init__(self, cfg: DataConfig):
        self.stain = []  # (jitter, share of crops it applies to)
        if cfg.stain_augment:
            self.stain = [
                (HEDJitter(cfg.hed_sigma, cfg.hed_bias), cfg.hed_probability),
                (HSVJitter(cfg.hsv_hue, cfg.hsv_saturation, cfg.hsv_value), 1.0),
            ]
        self.blur, self.solarize = cfg.blur, cfg.solarize
        self.mean, self.std = torch.tensor(cfg.mean), torch.tensor(cfg.std)

    def __call__(self, crops: torch.Tensor, solarize_from: int | None = None) -> torch.Tensor:
        """``crops`` (uint8) augmented; rows from ``solarize_from`` on (the second global
        crop of every image) may be solarized."""
        x = crops.float() / 255  # N x 3 x S x S in [0, 1]
        n = x.shape[0]
        for jitter, probability in self.stain:
            if probability >= 1:
                x = jitter(x)
            elif probability > 0:
                rows = torch.rand(n, device=x.device) < probability
                if rows.any():
                    x[rows] = jitter(x[rows])
        if self.blur > 0:
            rows = torch.rand(n, device=x.device) < self.blur
            if rows.any():
                low, high = BLUR_SIGMA
                sigma = low + (high - low) * torch.rand(int(rows.sum()), device=x.device)
                x[rows] = gaussian_blur(x[rows], sigma)
        if self.solarize > 0 and solarize_from is not None:
            rows = torch.rand(n, device=x.device) < self.solarize
            rows[:solarize_from] = False
            x[rows] = torch.where(x[rows] >= 128 / 255, 1 - x[rows], x[rows])
        mean = self.mean.to(x.device, x.dtype)[:, None, None]
        std = self.std.to(x.device, x.dtype)[:, None, None]
        return (x - mean) / std

    def batch(self, batch: dict) -> dict:
        """A collated batch (``global`` 2B and ``local`` nB uint8 crops) with float crops."""
        if batch["global"].dtype != torch.uint8:
            return batch
        images = batch["global"]
        out = dict(batch)
        out["global"] = self(images, solarize_from=images.shape[0] // 2)
        if batch["local"].numel():
            out["local"] = self(batch["local"])
        return out
