"""PANTHER slide embeddings (Song et al., CVPR 2024, "Morphological prototyping for
unsupervised slide representation learning in computational pathology").

A slide's tile features are summarised by a diagonal Gaussian mixture fitted by MAP-EM,
with a conjugate (Dirichlet / normal-inverse-Wishart style) prior centred on ``C``
morphological prototypes, the k-means centroids of tile features of the training slides.
The slide embedding is ``concat[pi (C), mu (C x d), Sigma (C x d)]``, length ``C + 2Cd``.

The EM follows the authors' implementation (``DirNIWNet.map_em`` / ``map_m_step`` and
``mog_eval`` of mahmoodlab/PANTHER):

- start: ``pi = 1/C``, ``mu = m`` (the prototypes), ``Sigma = V = eps`` (a variance:
  ``eps * softplus(log(e - 1)) = eps``, the same for every component and dimension);
- E-step: responsibilities ``q`` (N x C) of the diagonal Gaussians, ``Sigma`` a variance,
  masked for padded tiles;
- M-step with prior weight ``tau``, ``w = sum_n q + tau`` (C):
  ``pi = w / sum(w)``, ``mu = (sum_n q x + tau m) / w``,
  ``Sigma = (sum_n q x^2 + tau (V + m^2)) / w - mu^2``;
- defaults as the authors' scripts: one EM iteration, ``tau = 1``, ``eps = 1``, C = 16.

Prototypes are plain (Euclidean) k-means centroids of tiles sampled at random, an equal
number from each training slide (``C * samples_per_prototype`` in all), with faiss when it
is importable, else scikit-learn.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def sample_tiles(bags: list[np.ndarray], n_total: int, seed: int = 0) -> np.ndarray:  # M x d
    """Up to ``n_total`` tile features drawn at random, about the same number from each
    bag (as the reference: ``ceil(n_total / n_bags)`` per slide, all tiles of smaller ones)."""
    if not bags:
        raise ValueError("no training bags to sample prototypes from")
    rng = np.random.default_rng(seed)
    quota = math.ceil(n_total / len(bags))
    picked = []
    for bag in bags:
        bag = np.asarray(bag)
        keep = rng.choice(len(bag), size=min(quota, len(bag)), replace=False)
        picked.append(bag[np.sort(keep)])
    return np.concatenate(picked).astype(np.float32)[:n_total]


def fit_prototypes(
    tiles: np.ndarray,  # M x d
    n_prototypes: int = 16,
    seed: int = 0,
    n_init: int = 5,
    max_iter: int = 50,
    backend: str = "auto",
) -> np.ndarray:  # C x d
    """k-means centroids of ``tiles`` (the PANTHER prototypes). ``backend``: ``auto``
    (faiss when importable, else scikit-learn), ``faiss`` or ``sklearn``; seeded."""
    tiles = np.ascontiguousarray(tiles, dtype=np.float32)
    if len(tiles) < n_prototypes:
        raise ValueError(f"{n_prototypes} prototypes need at least as many tiles, got {len(tiles)}")
    if backend in ("auto", "faiss"):
        try:
            import faiss
        except ImportError:
            if backend == "faiss":
                raise
        else:
            km = faiss.Kmeans(tiles.shape[1], n_prototypes, niter=max_iter, nredo=n_init, seed=seed)
            km.train(tiles)
            return np.asarray(km.centroids, np.float32).reshape(n_prototypes, -1)
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=n_prototypes, n_init=n_init, max_iter=max_iter, random_state=seed)
    return km.fit(tiles).cluster_centers_.astype(np.float32)


def log_joint(
    x: torch.Tensor,  # B x N x d
    pi: torch.Tensor,  # B x C
    mu: torch.Tensor,  # B x C x d
    var: torch.Tensor,  # B x C x d
) -> torch.Tensor:  # B x N x C
    """``log pi_c + log N(x_n | mu_c, diag(var_c))`` of every tile and component."""
    d = x.shape[-1]
    inv = 1.0 / var  # B x C x d
    quad = (
        torch.bmm(x**2, inv.transpose(1, 2))
        - 2.0 * torch.bmm(x, (mu * inv).transpose(1, 2))
        + (mu**2 * inv).sum(-1).unsqueeze(1)
    )  # B x N x C
    norm = d * math.log(2 * math.pi) + var.log().sum(-1).unsqueeze(1)  # B x 1 x C
    return -0.5 * (norm + quad) + pi.log().unsqueeze(1)


def map_m_step(
    x: torch.Tensor,  # B x N x d
    q: torch.Tensor,  # B x N x C (zero on padded tiles)
    m: torch.Tensor,  # C x d prior means (prototypes)
    v: torch.Tensor,  # C x d prior variances
    tau: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAP M-step of the reference (prior weight ``tau``): ``(pi B x C, mu B x C x d,
    Sigma B x C x d)``, ``Sigma`` a variance."""
    w = q.sum(1) + tau  # B x C
    wx = torch.bmm(q.transpose(1, 2), x)  # B x C x d
    wxx = torch.bmm(q.transpose(1, 2), x**2)  # B x C x d
    pi = w / w.sum(1, keepdim=True)
    mu = (wx + tau * m.unsqueeze(0)) / w.unsqueeze(-1)
    var = (wxx + tau * (v + m**2).unsqueeze(0)) / w.unsqueeze(-1) - mu**2
    return pi, mu, var


def panther_em(
    x: torch.Tensor,  # B x N x d
    prototypes: torch.Tensor,  # C x d
    mask: torch.Tensor | None = None,  # B x N, 1 for real tiles, 0 for padding
    n_iter: int = 1,
    tau: float = 1.0,
    eps: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PANTHER's unsupervised MAP-EM of a diagonal Gaussian mixture per bag (see the module
    docstring): ``(pi B x C, mu B x C x d, Sigma B x C x d, q B x N x C)``, ``q`` the
    responsibilities of the last E-step."""
    B, N, _ = x.shape
    m = prototypes.to(x)
    C = m.shape[0]
    v = torch.full_like(m, eps)  # C x d
    if mask is None:
        mask = torch.ones(B, N, dtype=x.dtype, device=x.device)
    mask = mask.to(x)
    pi = torch.full((B, C), 1.0 / C, dtype=x.dtype, device=x.device)
    mu = m.unsqueeze(0).expand(B, -1, -1)
    var = v.unsqueeze(0).expand(B, -1, -1)
    q = torch.zeros(B, N, C, dtype=x.dtype, device=x.device)
    for _ in range(n_iter):
        q = torch.softmax(log_joint(x, pi, mu, var), dim=-1) * mask.unsqueeze(-1)
        pi, mu, var = map_m_step(x, q, m, v, tau)
    return pi, mu, var, q


def embedding_from_params(
    pi: torch.Tensor,  # B x C
    mu: torch.Tensor,  # B x C x d
    var: torch.Tensor,  # B x C x d
) -> torch.Tensor:  # B x (C + 2Cd)
    """The reference's ``allcat`` layout: ``[pi_1..pi_C, mu_1 (d), .., mu_C, Sigma_1, ..]``."""
    B = pi.shape[0]
    return torch.cat([pi.reshape(B, -1), mu.reshape(B, -1), var.reshape(B, -1)], dim=1)


def embedding_length(n_prototypes: int, dim: int) -> int:
    return n_prototypes + 2 * n_prototypes * dim


def pad_bags(
    bags: list[np.ndarray], dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags of different lengths as one zero-padded ``B x N_max x d`` tensor and its mask."""
    n_max, d = max(len(b) for b in bags), bags[0].shape[1]
    x = torch.zeros(len(bags), n_max, d, dtype=dtype)
    mask = torch.zeros(len(bags), n_max, dtype=dtype)
    for i, bag in enumerate(bags):
        x[i, : len(bag)] = torch.as_tensor(np.asarray(bag), dtype=dtype)
        mask[i, : len(bag)] = 1
    return x, mask


def panther_embed(
    bags: list[np.ndarray],
    prototypes: np.ndarray,  # C x d
    n_iter: int = 1,
    tau: float = 1.0,
    eps: float = 1.0,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
) -> np.ndarray:  # B x (C + 2Cd)
    """PANTHER embeddings of ``bags`` (each N_i x d), ``batch_size`` padded bags at a time."""
    protos = torch.as_tensor(np.asarray(prototypes), dtype=dtype, device=device)
    out = []
    with torch.no_grad():
        for i in range(0, len(bags), batch_size):
            x, mask = pad_bags(bags[i : i + batch_size], dtype)
            pi, mu, var, _ = panther_em(
                x.to(device), protos, mask.to(device), n_iter=n_iter, tau=tau, eps=eps
            )
            out.append(embedding_from_params(pi, mu, var).cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def mean_pool(bags: list[np.ndarray]) -> np.ndarray:  # B x d
    """Mean of each bag's tile features (the simplest slide embedding, for comparison)."""
    return np.stack([np.asarray(b, np.float64).mean(0) for b in bags]).astype(np.float32)
