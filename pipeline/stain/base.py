"""The stain-normalizer interface, its registry, JSON persistence and batched statistics.

Every normalizer has the same shape (as in torchstain): ``fit(target)`` from one or more
target images, then ``normalizer(batch)`` on a ``B x 3 x H x W`` uint8 or float batch,
on any device, with no Python loop over tiles. Fitted parameters are a small dict of
numbers (``state_dict``) saved as JSON. Tiles with too little tissue to estimate their
stains (blank glass, background) pass through unchanged and are counted in
``passthrough``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.errors import PipelineError
from pipeline.io import atomic_write_text
from pipeline.stain.color import check_batch, convert_batch, like_input, validate_batch

STAIN_METHODS: dict[str, type[StainNormalizer]] = {}


def register_stain_method(name: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        cls.method = name
        STAIN_METHODS[name] = cls
        return cls

    return add


def masked_quantile(
    values: torch.Tensor, mask: torch.Tensor, q: float, bins: int = 4096
) -> torch.Tensor:
    """Per-row ``q``-quantile (0-1) of ``values[b][mask[b]]`` for a ``B x N`` batch, in O(N).

    Nearest-rank definition (as ``kthvalue``-based percentiles), found in a histogram of
    ``bins`` bins between each row's masked min and max, so the error is at most half a
    bin. Rows with no masked value give NaN.
    """
    inf = torch.tensor(float("inf"), device=values.device, dtype=values.dtype)
    lo = torch.where(mask, values, inf).amin(dim=1)  # B
    hi = torch.where(mask, values, -inf).amax(dim=1)  # B
    span = (hi - lo).clamp_min(1e-12)
    idx = ((values - lo[:, None]) / span[:, None] * bins).long().clamp(0, bins - 1)  # B x N
    counts = torch.zeros(values.shape[0], bins, device=values.device, dtype=values.dtype)
    counts.scatter_add_(1, idx, mask.to(values.dtype))
    cdf = counts.cumsum(dim=1)  # B x bins
    n = mask.sum(dim=1).to(values.dtype)
    rank = 1 + torch.round(q * (n - 1))  # 1-based nearest rank
    bin_index = torch.searchsorted(cdf, rank[:, None]).squeeze(1).clamp(max=bins - 1)
    result = lo + (bin_index.to(values.dtype) + 0.5) * span / bins
    return torch.where(n > 0, torch.minimum(torch.maximum(result, lo), hi), torch.nan)


class StainNormalizer:
    """Base class: fit to a target, then normalize batches to its stain appearance."""

    method = "base"
    works_on_uint8 = False  # normalize_batch takes uint8 (else float in [0, 1])
    chunk_pixels = 1 << 20  # pixels per normalize_batch call on CPU

    def __init__(self) -> None:
        self.passthrough = 0  # tiles returned unchanged (too little tissue)
        self.seen = 0

    # -- the interface every method implements ------------------------------------
    def fit_batch(self, target: torch.Tensor) -> None:
        """Set the reference from ``B x 3 x H x W`` float images in [0, 1]."""
        raise NotImplementedError

    def normalize_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(normalized images, B bool: tile was normalized)`` for a checked batch (float in
        [0, 1], or uint8 when ``works_on_uint8``); results in the same dtype."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict, device: str | torch.device = "cpu") -> None:
        raise NotImplementedError

    # -- shared behaviour ---------------------------------------------------------
    def fit(self, target: torch.Tensor | list[torch.Tensor]) -> StainNormalizer:
        """Fit to one image (``3 x H x W``), a batch, or a list of images: pixels are pooled."""
        images = target if isinstance(target, list | tuple) else [target]
        pixels = [check_batch(t, "target").permute(1, 0, 2, 3).reshape(3, -1) for t in images]
        self.fit_batch(torch.cat(pixels, dim=1)[None, :, :, None])  # 1 x 3 x P x 1
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Normalize a ``B x 3 x H x W`` (or ``3 x H x W``) uint8 or float batch.

        Returns the input's dtype and shape; tiles that pass through are the input tiles.
        """
        if not self.is_fitted:
            raise PipelineError(f"the {self.method} normalizer is not fitted: call fit() or load()")
        batch = validate_batch(images)
        if batch.shape[0] == 0:
            return images
        out = torch.empty_like(batch)
        per_image = batch.shape[2] * batch.shape[3]
        # cache-sized chunks on CPU (large tensors are slower there); one call on accelerators
        step = max(1, self.chunk_pixels // per_image) if batch.device.type == "cpu" else len(batch)
        passthrough = 0
        with torch.autocast(batch.device.type, enabled=False):  # stain fits need fp32 (pinv, eigh)
            for start in range(0, len(batch), step):
                chunk = batch[start : start + step]
                result, done = self.normalize_batch(convert_batch(chunk, self.works_on_uint8))
                result = like_input(result, chunk)
                if not done.all():  # tiles without enough tissue come back unchanged
                    result[~done] = chunk[~done]
                    passthrough += int((~done).sum())
                out[start : start + step] = result
        self.seen += int(batch.shape[0])
        self.passthrough += passthrough
        return out[0] if images.ndim == 3 else out

    @property
    def is_fitted(self) -> bool:
        try:
            return bool(self.state_dict())
        except (AttributeError, TypeError):
            return False

    def to(self, device: str | torch.device) -> StainNormalizer:
        self.load_state_dict(self.state_dict(), device=device)
        return self

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``{"method": ..., "params": ...}`` as JSON (atomically)."""
        body = {"method": self.method, "params": self.state_dict()}
        return atomic_write_text(path, json.dumps(body, indent=1))


def load_normalizer(
    source: str | os.PathLike | dict, device: str | torch.device = "cpu"
) -> StainNormalizer:
    """A fitted normalizer from a JSON file written by :meth:`StainNormalizer.save`, a preset
    name (:data:`pipeline.stain.presets.STAIN_PRESETS`, e.g. ``exapath``) or such a file's
    ``{"method", "params"}`` dict (as an exported encoder records it)."""
    from pipeline.stain.presets import normalizer_body

    body = source if isinstance(source, dict) else normalizer_body(source)
    try:
        cls = STAIN_METHODS[body["method"]]
        normalizer = cls()
        normalizer.load_state_dict(body["params"], device=device)
    except (KeyError, TypeError, ValueError) as exc:
        where = "the stain normalizer" if isinstance(source, dict) else str(source)
        raise PipelineError(
            f"{where}: not a stain normalizer ({type(exc).__name__}: {exc}); known methods: "
            f"{', '.join(sorted(STAIN_METHODS))}"
        ) from exc
    return normalizer


def make_normalizer(method: str, **kwargs) -> StainNormalizer:
    if method not in STAIN_METHODS:
        raise PipelineError(
            f"unknown stain method '{method}'; known: {', '.join(sorted(STAIN_METHODS))}"
        )
    return STAIN_METHODS[method](**kwargs)
