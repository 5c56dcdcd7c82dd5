"""Vahadane stain normalization, batched.

Vahadane et al., "Structure-preserving color normalization and sparse stain separation
for histological images", IEEE TMI 2016: the stain matrix W (3 x 2) and concentrations
H (2 x N) factorize the optical density of tissue pixels, V ~ W H, with W, H >= 0 and
an L1 penalty on H (sparse NMF). Concentrations are then mapped as in Macenko (99th
percentiles) and recomposed with the target's stain matrix.

Deviations: the sparse NMF is solved by multiplicative updates (Lee & Seung) with the
L1 term, for a fixed number of iterations, on the whole batch at once, on every
``stride``-th pixel, started from the Macenko estimate (the reference uses SPAMS
dictionary learning); the concentrations of all pixels are then the non-negative part of
the least-squares solution for that W (the reference solves a lasso per pixel).
"""

from __future__ import annotations

import torch

from pipeline.stain.base import StainNormalizer, masked_quantile, register_stain_method
from pipeline.stain.macenko import MacenkoNormalizer


@register_stain_method("vahadane")
class VahadaneNormalizer(StainNormalizer):
    """Vahadane normalizer (sparse NMF stain separation).

    Args:
        sparsity: L1 weight on the concentrations (lambda of the paper).
        iterations: multiplicative-update iterations of the factorization.
        stride: the factorization uses every ``stride``-th pixel.
        io, beta, min_tissue: as for :class:`MacenkoNormalizer`.
    """

    def __init__(
        self,
        sparsity: float = 0.1,
        iterations: int = 60,
        io: float = 240.0,
        beta: float = 0.15,
        min_tissue: float = 0.05,
        stride: int = 4,
    ):
        super().__init__()
        self.sparsity, self.iterations, self.stride = sparsity, iterations, stride
        self.macenko = MacenkoNormalizer(io=io, beta=beta, min_tissue=min_tissue)
        self.stains: torch.Tensor | None = None
        self.max_conc: torch.Tensor | None = None

    def _factorize(
        self, od: torch.Tensor, w: torch.Tensor, h: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse NMF ``od ~ w h`` by multiplicative updates (``B x 3 x 2``, ``B x 2 x n``)."""
        eps = 1e-8
        for _ in range(self.iterations):
            h = h * (w.transpose(1, 2) @ od) / (w.transpose(1, 2) @ w @ h + self.sparsity + eps)
            hw = h * weights[:, None]  # only tissue pixels shape the stains
            w = w * (od @ hw.transpose(1, 2)) / (w @ hw @ hw.transpose(1, 2) + eps)
            w = w / w.norm(dim=1, keepdim=True).clamp_min(eps)
        return w, h

    def estimate(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        od = (-torch.log((x * 255.0 + 1.0) / self.macenko.io)).flatten(2).clamp_min(0)  # B x 3 x N
        stains, pinv, _, ok = self.macenko.estimate(od)  # the starting point
        sample = od[:, :, :: self.stride]  # the factorization runs on a pixel subsample
        tissue = (sample >= self.macenko.beta).all(dim=1)
        w0 = stains.abs().clamp_min(1e-3)
        h0 = (pinv @ sample).clamp_min(1e-3)
        w, _ = self._factorize(sample, w0, h0, tissue.to(od.dtype))
        h_first = (w[:, 0, 0] >= w[:, 0, 1])[:, None, None]  # H has the larger red OD
        w = torch.where(h_first, w, w.flip(2))
        conc = (torch.linalg.pinv(w) @ od).clamp_min(0)  # B x 2 x N, non-negative
        everywhere = torch.ones(conc.shape[0], conc.shape[2], dtype=torch.bool, device=x.device)
        max_conc = torch.stack([masked_quantile(conc[:, i], everywhere, 0.99) for i in range(2)], 1)
        ok &= torch.isfinite(w).flatten(1).all(1) & (max_conc > 1e-6).all(1)
        return w, conc, max_conc, ok

    def fit_batch(self, target: torch.Tensor) -> None:
        stains, _, max_conc, ok = self.estimate(target)
        if not ok[0]:
            raise ValueError("the target has too little tissue to estimate its stains")
        self.stains, self.max_conc = stains[0], max_conc[0]

    def normalize_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, conc, max_conc, ok = self.estimate(x)
        scale = torch.where(ok[:, None], self.max_conc.to(x) / max_conc, torch.ones_like(max_conc))
        recon = self.macenko.io * torch.exp(-(self.stains.to(x) @ (conc * scale[..., None])))
        return (recon.clamp(0, 255) / 255.0).reshape(x.shape), ok

    def state_dict(self) -> dict:
        if self.stains is None:
            return {}
        return {
            "stains": self.stains.cpu().tolist(),
            "max_conc": self.max_conc.cpu().tolist(),
            "sparsity": self.sparsity,
            "iterations": self.iterations,
        }

    def load_state_dict(self, state: dict, device: str | torch.device = "cpu") -> None:
        self.stains = torch.tensor(state["stains"], dtype=torch.float32, device=device)
        self.max_conc = torch.tensor(state["max_conc"], dtype=torch.float32, device=device)
        self.sparsity = state.get("sparsity", self.sparsity)
        self.iterations = state.get("iterations", self.iterations)
