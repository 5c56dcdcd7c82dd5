"""Stain augmentation on ``B x 3 x H x W`` batches (or single ``3 x H x W`` tiles), any device.

Each image draws its own parameters, so a batch is augmented in one pass with no Python
loop over images. uint8 in, uint8 out; float in [0, 1] in, float out. Usable inside
DataLoader workers (per tile) or on the GPU (per batch); pass a ``torch.Generator`` for
reproducible draws.
"""

from __future__ import annotations

import math

import torch

from pipeline.stain.base import StainNormalizer
from pipeline.stain.color import check_batch, hed_to_rgb, like_input, rgb_to_hed


def _uniform(
    shape: tuple[int, ...],
    low: float,
    high: float,
    like: torch.Tensor,
    generator: torch.Generator | None,
) -> torch.Tensor:
    u = torch.rand(
        shape, generator=generator, device="cpu" if generator is not None else like.device
    )
    return (low + (high - low) * u).to(like.device, like.dtype)


class HEDJitter:
    """Per-channel scale and shift of the H, E, DAB concentrations (Tellez et al., 2018).

    ``hed' = hed * a + b`` with ``a ~ U(1 - sigma, 1 + sigma)`` and ``b ~ U(-bias, bias)``
    per image and channel; background stays white because DAB/H/E of glass are ~0 and the
    shift is scaled by the tile's mean concentration.
    """

    def __init__(
        self, sigma: float = 0.05, bias: float = 0.05, generator: torch.Generator | None = None
    ):
        self.sigma, self.bias, self.generator = sigma, bias, generator

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = check_batch(images)
        hed = rgb_to_hed(x, clip=False)  # B x 3 x H x W, exactly invertible
        b = x.shape[0]
        scale = _uniform((b, 3, 1, 1), 1 - self.sigma, 1 + self.sigma, x, self.generator)
        shift = _uniform((b, 3, 1, 1), -self.bias, self.bias, x, self.generator)
        level = hed.clamp_min(0).mean(dim=(2, 3), keepdim=True)  # shifts relative to the staining
        return like_input(hed_to_rgb(hed * scale + shift * level), images)


class HSVJitter:
    """Per-image hue rotation, saturation and brightness scaling.

    Hue is rotated by ``U(-hue, hue)`` turns (a rotation about the grey axis of RGB, the
    YIQ-space approximation of a hue shift); saturation is scaled by ``U(1 - saturation,
    1 + saturation)`` around each pixel's grey level and brightness by ``U(1 - value,
    1 + value)``.
    """

    def __init__(
        self,
        hue: float = 0.03,
        saturation: float = 0.1,
        value: float = 0.1,
        generator: torch.Generator | None = None,
    ):
        self.hue, self.saturation, self.value, self.generator = hue, saturation, value, generator

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = check_batch(images)
        b = x.shape[0]
        angle = _uniform((b,), -self.hue, self.hue, x, self.generator) * 2 * math.pi
        cos, sin = torch.cos(angle), torch.sin(angle)
        k = 1 / 3
        s3 = math.sqrt(k)
        # Rodrigues rotation about (1, 1, 1)/sqrt(3): B x 3 x 3
        rot = torch.stack(
            [
                torch.stack(
                    [cos + (1 - cos) * k, k * (1 - cos) - s3 * sin, k * (1 - cos) + s3 * sin], -1
                ),
                torch.stack(
                    [k * (1 - cos) + s3 * sin, cos + (1 - cos) * k, k * (1 - cos) - s3 * sin], -1
                ),
                torch.stack(
                    [k * (1 - cos) - s3 * sin, k * (1 - cos) + s3 * sin, cos + (1 - cos) * k], -1
                ),
            ],
            dim=1,
        )
        y = torch.einsum("bij,bjhw->bihw", rot, x)
        grey = y.mean(dim=1, keepdim=True)
        sat = _uniform((b, 1, 1, 1), 1 - self.saturation, 1 + self.saturation, x, self.generator)
        val = _uniform((b, 1, 1, 1), 1 - self.value, 1 + self.value, x, self.generator)
        y = (grey + (y - grey) * sat) * val
        return like_input(y.clamp(0, 1), images)


class StainBankTransfer:
    """Random stain transfer from a bank of fitted normalizers (RandStainNA-style).

    Each image is normalized to a randomly chosen reference of the bank, with the
    reference's stain parameters perturbed by ``jitter`` (relative), so that training
    sees plausible stainings beyond the ones fitted (Shen et al., MICCAI 2022).
    Images are grouped by chosen reference: one batched call per reference.
    """

    def __init__(
        self,
        bank: list[StainNormalizer],
        jitter: float = 0.05,
        generator: torch.Generator | None = None,
    ):
        if not bank:
            raise ValueError("the stain bank is empty: fit at least one normalizer")
        self.bank, self.jitter, self.generator = bank, jitter, generator

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = check_batch(images)
        out = x.clone()
        pick = torch.randint(len(self.bank), (x.shape[0],), generator=self.generator)
        for i in pick.unique().tolist():
            rows = (pick == i).nonzero().flatten().to(x.device)
            reference = self.bank[i]
            state = reference.state_dict()
            noisy = type(reference)()
            noisy.load_state_dict(state, device=x.device)
            for name in ("stains", "max_conc", "mean", "std"):
                value = getattr(noisy, name, None)
                if isinstance(value, torch.Tensor):
                    noise = _uniform(
                        tuple(value.shape), 1 - self.jitter, 1 + self.jitter, value, self.generator
                    )
                    setattr(noisy, name, value * noise)
            out[rows] = check_batch(noisy(x[rows]))
        return like_input(out, images)
