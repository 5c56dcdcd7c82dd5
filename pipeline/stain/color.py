"""Batched colour-space conversions on torch tensors (CPU or CUDA), and input checks.

Images are ``B x 3 x H x W``; uint8 in [0, 255] or float in [0, 1]. The constants are
scikit-image's (sRGB, D65 white; Ruifrok & Johnston's H&E-DAB matrix), so results match
``skimage.color.rgb2lab`` / ``rgb2hed`` on the same pixels.
"""

from __future__ import annotations

import torch
from skimage.color import colorconv

_XYZ_FROM_RGB = torch.tensor(colorconv.xyz_from_rgb, dtype=torch.float32)
_RGB_FROM_XYZ = torch.linalg.inv(_XYZ_FROM_RGB.double()).float()
_WHITE = torch.tensor(colorconv._illuminants["D65"]["2"], dtype=torch.float32)
RGB_FROM_HED = torch.tensor(colorconv.rgb_from_hed, dtype=torch.float32)  # rows: H, E, DAB
HED_FROM_RGB = torch.tensor(colorconv.hed_from_rgb, dtype=torch.float32)


def validate_batch(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    """Check a ``B x 3 x H x W`` (or ``3 x H x W``) uint8 or float batch; return it as 4-D.

    Raises ``ValueError`` naming what is wrong (shape, dtype, range, NaN).
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(images).__name__}")
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"{name}: expected B x 3 x H x W (or 3 x H x W), got {tuple(images.shape)}"
        )
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"{name}: expected uint8 or float, got {images.dtype}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    if images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
        raise ValueError(
            f"{name}: float images must lie in [0, 1] (got {images.min():.3g}..{images.max():.3g}); "
            "divide uint8 values by 255 or pass the uint8 tensor"
        )
    return images


def convert_batch(images: torch.Tensor, as_uint8: bool = False) -> torch.Tensor:
    """A validated batch as float32 in [0, 1], or as uint8 (floats rounded to 8 bits)."""
    if images.dtype == torch.uint8:
        return images if as_uint8 else images.float() / 255.0
    x = images.float().clamp(0, 1)
    return (x * 255 + 0.5).to(torch.uint8) if as_uint8 else x


def check_batch(images: torch.Tensor, name: str = "images", as_uint8: bool = False) -> torch.Tensor:
    """Validate a ``B x 3 x H x W`` (or ``3 x H x W``) batch (see :func:`validate_batch`).

    Returns float32 in [0, 1], or uint8 when ``as_uint8`` (floats are rounded to 8 bits).
    """
    return convert_batch(validate_batch(images, name), as_uint8)


def like_input(result: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Return a result (float in [0, 1] or uint8) in the dtype and rank of the original input."""
    if original.dtype == torch.uint8:
        if result.dtype != torch.uint8:
            result = (result * 255.0).round().clamp(0, 255).to(torch.uint8)
    elif result.dtype == torch.uint8:
        result = (result.float() / 255.0).to(original.dtype)
    else:
        result = result.to(original.dtype)
    return result[0] if original.ndim == 3 else result


def _mix(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out[:, i] = sum_j matrix[j, i] * x[:, j]`` (row-vector convention of skimage)."""
    return torch.einsum("ji,bjhw->bihw", matrix.to(x), x)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIE L*a*b* (D65) of ``B x 3 x H x W`` RGB in [0, 1]."""
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = _mix(_XYZ_FROM_RGB.T, linear) / _WHITE.to(rgb).view(1, 3, 1, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] of ``B x 3 x H x W`` CIE L*a*b* (D65), clipped to the gamut."""
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], dim=1)
    xyz = torch.where(f > 0.2068966, f**3, (f - 16 / 116) / 7.787) * _WHITE.to(lab).view(1, 3, 1, 1)
    linear = _mix(_RGB_FROM_XYZ.T, xyz).clamp_min(0)
    rgb = torch.where(
        linear > 0.0031308, 1.055 * linear.clamp_min(1e-12) ** (1 / 2.4) - 0.055, 12.92 * linear
    )
    return rgb.clamp(0, 1)


_LOG_ADJUST = float(torch.log(torch.tensor(1e-6, dtype=torch.float64)))  # as scikit-image


def rgb_to_hed(rgb: torch.Tensor, clip: bool = True) -> torch.Tensor:
    """Haematoxylin, eosin, DAB concentrations (colour deconvolution, Ruifrok & Johnston 2001).

    ``clip`` sets negative concentrations to 0 as scikit-image does; without it the
    conversion is exactly invertible by :func:`hed_to_rgb`.
    """
    od = torch.log(rgb.clamp_min(1e-6)) / _LOG_ADJUST  # B x 3 x H x W, >= 0
    hed = _mix(HED_FROM_RGB, od)
    return hed.clamp_min(0) if clip else hed


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] from H, E, DAB concentrations (inverse of :func:`rgb_to_hed`)."""
    return torch.exp(_mix(RGB_FROM_HED, hed * _LOG_ADJUST)).clamp(0, 1)
