"""Macenko stain normalization, batched.

Macenko et al., "A method for normalizing histology slides for quantitative analysis",
ISBI 2009. Per image: optical density OD = -log((I + 1) / Io); pixels with every OD
channel >= beta are tissue; the plane of the two largest eigenvectors of their OD
covariance holds the stains; the alpha and (100 - alpha) percentiles of the pixel
angles in that plane give the H and E vectors (H first: the one with larger red OD);
concentrations are the least-squares solution C = pinv(S) OD; their 99th percentiles
scale them to the target's, and the target's stain matrix recomposes the image:
I' = Io exp(-S_ref diag(k) pinv(S) OD).

Deviations from the reference code (torchstain / HEnorm_python), none changing the
result by more than rounding: every step runs on the whole batch at once; stains and
percentiles are estimated on every ``stride``-th pixel (default 2: 25k of a 224-px
tile's 50k); percentiles come from a per-image histogram (error below 1/4096 of the
range) instead of a sort; OD comes from a 256-entry table of the 8-bit values, and the
whole recomposition is one 3 x 3 matrix per image, ``S_ref diag(k) pinv(S)``, applied
to OD with a batched matmul.
"""

from __future__ import annotations

import torch

from pipeline.stain.base import StainNormalizer, masked_quantile, register_stain_method

# H&E stain vectors of the reference implementation, used where a tile has no tissue
DEFAULT_STAINS = torch.tensor([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])


@register_stain_method("macenko")
class MacenkoNormalizer(StainNormalizer):
    """Macenko normalizer: ``fit(target)``, then ``normalizer(batch)``.

    Args:
        io: transmitted light intensity (0-255 scale).
        alpha: percentile (%) of the stain-vector angles.
        beta: OD threshold of transparent (background) pixels.
        min_tissue: least share of tissue pixels for a tile to be normalized.
        stride: stains and percentiles are estimated on every ``stride``-th pixel.
        min_similarity: least cosine similarity of a tile's H and E vectors to typical H&E
            ones; tiles below (pen ink, dyes, artefacts) pass through. 0 disables the check.
    """

    works_on_uint8 = True

    def __init__(
        self,
        io: float = 240.0,
        alpha: float = 1.0,
        beta: float = 0.15,
        min_tissue: float = 0.05,
        stride: int = 2,
        min_similarity: float = 0.9,
    ):
        super().__init__()
        self.io, self.alpha, self.beta = io, alpha, beta
        self.min_tissue, self.stride, self.min_similarity = min_tissue, stride, min_similarity
        self.stains: torch.Tensor | None = None  # 3 x 2 reference stain matrix (H, E columns)
        self.max_conc: torch.Tensor | None = None  # 2 reference 99th-percentile concentrations

    def od_table(self, device: torch.device) -> torch.Tensor:
        """OD of each 8-bit value: ``-log((v + 1) / Io)`` (256)."""
        return -torch.log((torch.arange(256, device=device, dtype=torch.float32) + 1) / self.io)

    def estimate(self, od: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """From per-image optical densities ``B x 3 x N``: stain matrices ``B x 3 x 2``, their
        pseudo-inverses ``B x 2 x 3``, 99th-percentile concentrations ``B x 2`` and ``B`` bool:
        enough tissue to trust them. Every ``stride``-th pixel is used."""
        b = od.shape[0]
        od = od[:, :, :: self.stride]  # B x 3 x n
        tissue = (od >= self.beta).all(dim=1)  # B x n
        n = tissue.sum(dim=1)  # B
        weights = tissue.to(od.dtype)
        mean = (od * weights[:, None]).sum(2) / n.clamp_min(1)[:, None]  # B x 3
        centred = (od - mean[..., None]) * weights[:, None]  # B x 3 x n
        cov = centred @ centred.transpose(1, 2) / (n - 1).clamp_min(1)[:, None, None]  # B x 3 x 3
        _, vectors = torch.linalg.eigh(cov + 1e-9 * torch.eye(3, device=od.device))  # ascending
        plane = vectors[:, :, 1:]  # B x 3 x 2: the two largest
        proj = plane.transpose(1, 2) @ od  # B x 2 x n
        phi = torch.atan2(proj[:, 1], proj[:, 0])  # B x n
        lo = masked_quantile(phi, tissue, self.alpha / 100)
        hi = masked_quantile(phi, tissue, 1 - self.alpha / 100)
        v_min = (plane @ torch.stack([torch.cos(lo), torch.sin(lo)], 1)[..., None])[..., 0]  # B x 3
        v_max = (plane @ torch.stack([torch.cos(hi), torch.sin(hi)], 1)[..., None])[..., 0]
        h_first = (v_min[:, 0] > v_max[:, 0])[:, None]
        stains = torch.stack(
            [torch.where(h_first, v_min, v_max), torch.where(h_first, v_max, v_min)], dim=2
        )  # B x 3 x 2
        finite = torch.isfinite(stains).flatten(1).all(1)  # no tissue: angles are NaN
        stains = torch.where(finite[:, None, None], stains, DEFAULT_STAINS.to(stains))
        pinv = torch.linalg.pinv(stains)  # B x 2 x 3
        conc = pinv @ od  # B x 2 x n
        everywhere = torch.ones_like(tissue)
        max_conc = torch.stack([masked_quantile(conc[:, i], everywhere, 0.99) for i in range(2)], 1)
        typical = DEFAULT_STAINS.to(stains) / DEFAULT_STAINS.norm(dim=0).to(stains)
        similarity = (stains / stains.norm(dim=1, keepdim=True) * typical).sum(dim=1)  # B x 2
        ok = finite & (n >= self.min_tissue * od.shape[2]) & (n >= 16)
        ok &= (similarity >= self.min_similarity).all(dim=1)
        ok &= torch.isfinite(max_conc).all(1) & (max_conc > 1e-6).all(1)
        return stains, pinv, max_conc, ok.reshape(b)

    def fit_batch(self, target: torch.Tensor) -> None:
        x8 = (target * 255 + 0.5).to(torch.uint8)
        stains, _, max_conc, ok = self.estimate(self.od_table(x8.device)[x8.flatten(2).long()])
        if not ok[0]:
            raise ValueError("the target has too little tissue to estimate its stains")
        self.stains, self.max_conc = stains[0], max_conc[0]

    def normalize_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        od = torch.take(self.od_table(x.device), x.flatten(2).long())  # B x 3 x N
        _, pinv, max_conc, ok = self.estimate(od)
        scale = torch.where(ok[:, None], self.max_conc.to(max_conc) / max_conc, 1.0)  # B x 2
        mix = self.stains.to(pinv) @ (scale[..., None] * pinv)  # B x 3 x 3: OD -> target OD
        out = torch.bmm(mix, od).neg_().exp_().mul_(self.io)  # B x 3 x N
        return out.clamp_(0, 255).add_(0.5).to(torch.uint8).reshape(x.shape), ok

    def state_dict(self) -> dict:
        if self.stains is None:
            return {}
        return {
            "stains": self.stains.cpu().tolist(),
            "max_conc": self.max_conc.cpu().tolist(),
            "io": self.io,
            "alpha": self.alpha,
            "beta": self.beta,
            "min_tissue": self.min_tissue,
            "stride": self.stride,
            "min_similarity": self.min_similarity,
        }

    def load_state_dict(self, state: dict, device: str | torch.device = "cpu") -> None:
        self.stains = torch.tensor(state["stains"], dtype=torch.float32, device=device)
        self.max_conc = torch.tensor(state["max_conc"], dtype=torch.float32, device=device)
        for key in ("io", "alpha", "beta", "min_tissue", "stride", "min_similarity"):
            setattr(self, key, state.get(key, getattr(self, key)))
