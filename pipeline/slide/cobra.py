"""COBRA slide encoder (Lenz et al., "Unsupervised Foundation Model-Agnostic Slide-Level
Representation Learning", CVPR 2025): the network, the MoCo v3 loss and the aggregation of
any foundation model's tile features by its attention.

The network reads one foundation model's tile features of a slide (``B x N x D_m``):

1. a per-model input embedding (LayerNorm, Linear, Dropout, SiLU, Linear) to a common width E;
2. a few residual sequence blocks over the tiles in a fixed order (sorted by y, then x):
   Mamba-2 (``mamba_ssm``) when it is importable and a GPU is present, else a pure-torch
   bidirectional diagonal state-space block (S4D-style kernel, applied by FFT convolution,
   gated like Mamba);
3. multi-head gated attention pooling (Ilse et al., ICML 2018): the E channels are split in
   H chunks, each head computes gated-attention logits on its chunk, the logits are averaged
   over heads and one softmax over the tiles gives the slide's attention (as COBRA does);
4. for training only, a projector (to the contrastive space) and, on the online branch, a
   predictor, trained with the MoCo v3 loss (Chen et al., ICCV 2021) against a momentum copy.

At inference the attention computed from a supported model's features weights the raw tile
features of any model (matched by tile coordinates), so the slide embedding lives in that
model's feature space (:func:`aggregate`, :func:`match_coords`).

Deviations from the reference code: the pure-torch state-space block replaces Mamba-2 where
``mamba_ssm`` cannot run (CPU); heads take contiguous channel chunks instead of interleaved
ones (the same up to a fixed permutation of learned channels); padded tiles are masked (the
reference resamples every view to a fixed tile count instead); input embeddings are keyed by
model name, not by feature width, so two models of the same width stay distinct.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def moco_v3_loss(q: torch.Tensor, k: torch.Tensor, tau: float = 0.2) -> torch.Tensor:
    """One direction of the MoCo v3 contrastive loss: ``2 tau CE(q k^T / tau, arange(B))``.

    ``q`` (B x C, online predictions) and ``k`` (B x C, momentum keys) are L2-normalised;
    row i of ``q`` has its positive in row i of ``k`` and the other rows as negatives. The
    symmetrised loss of two views is ``moco_v3_loss(q1, k2) + moco_v3_loss(q2, k1)``
    (a sum, as in MoCo v3 and COBRA). Computed in float32.
    """
    q = F.normalize(q.float(), dim=1)  # B x C
    k = F.normalize(k.float(), dim=1)  # B x C
    logits = q @ k.T / tau  # B x B
    labels = torch.arange(len(q), device=q.device)
    return F.cross_entropy(logits, labels) * (2 * tau)


class InputEmbed(nn.Module):
    """One foundation model's tile features (``B x N x D_m``) to the common width E."""

    def __init__(self, dim: int, width: int, dropout: float = 0.25) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, width),
            nn.Dropout(dropout),
            nn.SiLU(),
            nn.Linear(width, width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # B x N x E


class StateSpaceBlock(nn.Module):
    """Residual, gated, bidirectional diagonal state-space block (pure torch).

    Per channel ``e`` and state ``s`` a linear recurrence ``h_t = a h_{t-1} + (1 - a) b x_t``,
    ``y_t = sum_s c h_t`` with ``0 < a < 1`` (the input scaled by ``1 - a``, so a slow state
    is a running mean rather than a running sum): a convolution with the kernel
    ``K_k = sum_s c b (1 - a) a^k``, applied by FFT in both directions along the tile
    sequence (time-invariant, unlike Mamba's selective scan), gated by ``silu(z)`` as in
    Mamba.
    Padded tiles (``mask`` False) are zeroed before the convolutions, so they do not
    reach valid tiles from either side.
    """

    def __init__(self, width: int, d_state: int = 16, expand: int = 2, dropout: float = 0.0):
        super().__init__()
        inner = expand * width
        self.norm = nn.LayerNorm(width)
        self.in_proj = nn.Linear(width, 2 * inner)
        # decays spread over time scales 1 ... 1000 tiles, per direction
        scales = torch.logspace(0, 3, d_state).repeat(2 * inner, 1)  # 2I x S
        self.log_scale = nn.Parameter(scales.log())
        self.bc = nn.Parameter(torch.randn(2 * inner, d_state) / math.sqrt(d_state))  # 2I x S
        self.skip = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, width)
        self.drop = nn.Dropout(dropout)

    def kernel(self, length: int) -> torch.Tensor:
        """``2I x length`` convolution kernels (forward then backward direction)."""
        log_a = -1.0 / self.log_scale.exp()  # 2I x S, log of the decay in (0, 1)
        steps = torch.arange(length, device=log_a.device, dtype=log_a.dtype)  # L
        k = torch.zeros(log_a.shape[0], length, device=log_a.device, dtype=log_a.dtype)
        for s in range(log_a.shape[1]):  # one state at a time: memory 2I x L, not 2I x S x L
            gain = self.bc[:, s, None] * -torch.expm1(log_a[:, s, None])  # 2I x 1, b (1 - a)
            k = k + gain * torch.exp(log_a[:, s, None] * steps)  # 2I x L
        return k

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        u, z = self.in_proj(self.norm(x)).chunk(2, dim=-1)  # B x N x I each
        u = F.silu(u) * mask[..., None]  # B x N x I, padding zeroed
        inner = u.shape[-1]
        k = self.kernel(N)  # 2I x N
        n_fft = 2 * N
        both = torch.cat([u, u.flip(1)], dim=-1).transpose(1, 2)  # B x 2I x N
        y = torch.fft.irfft(
            torch.fft.rfft(both.float(), n_fft) * torch.fft.rfft(k.float(), n_fft), n_fft
        )[..., :N]  # B x 2I x N
        y = y.transpose(1, 2).to(u.dtype)  # B x N x 2I
        y = y[..., :inner] + y[..., inner:].flip(1) + self.skip * u  # B x N x I
        return x + self.drop(self.out_proj(y * F.silu(z)))  # B x N x E


class Mamba2Block(nn.Module):
    """Residual pre-norm Mamba-2 layer (``mamba_ssm``, GPU only); padded tiles are zeroed,
    they sit after the valid ones so the causal scan never carries them into valid tiles."""

    def __init__(self, width: int, d_state: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        from mamba_ssm import Mamba2

        self.norm = nn.LayerNorm(width)
        self.mixer = Mamba2(d_model=width, d_state=d_state, headdim=max(8, width // 8))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm(x) * mask[..., None]  # B x N x E
        return x + self.drop(self.mixer(h))  # B x N x E


def mamba_available() -> bool:
    """Whether Mamba-2 layers can run here: ``mamba_ssm`` importable and a GPU present."""
    if not torch.cuda.is_available():
        return False
    try:
        import mamba_ssm  # noqa: F401
    except ImportError:
        return False
    return True


def projection_mlp(dim_in: int, hidden: int, dim_out: int, dropout: float) -> nn.Sequential:
    """COBRA's projector and MoCo v3 predictor: LayerNorm, Linear, SiLU, Dropout, Linear,
    BatchNorm (``B x dim_in -> B x dim_out``)."""
    return nn.Sequential(
        nn.LayerNorm(dim_in),
        nn.Linear(dim_in, hidden),
        nn.SiLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, dim_out),
        nn.BatchNorm1d(dim_out),
    )


class GatedAttentionHeads(nn.Module):
    """Multi-head gated attention pooling (Ilse et al., ICML 2018), heads averaged as COBRA.

    Head j reads channel chunk j of ``h`` (``B x N x E/H``) and scores each tile with
    ``w_j^T (tanh(V_j h) * sigmoid(U_j h))``; the H logits are averaged and one softmax over
    the valid tiles gives ``attention`` (B x N). ``head_attention`` (B x H x N) is each
    head's own softmax, for inspection.
    """

    def __init__(self, width: int, heads: int = 8, att_dim: int = 96, dropout: float = 0.25):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.heads = heads
        chunk = width // heads
        self.v = nn.ModuleList(nn.Linear(chunk, att_dim) for _ in range(heads))
        self.u = nn.ModuleList(nn.Linear(chunk, att_dim) for _ in range(heads))
        self.w = nn.ModuleList(nn.Linear(att_dim, 1) for _ in range(heads))
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        chunks = h.chunk(self.heads, dim=-1)  # H x (B x N x E/H)
        logits = torch.stack(
            [
                w(self.drop(torch.tanh(v(c)) * torch.sigmoid(u(c)))).squeeze(-1)  # B x N
                for c, v, u, w in zip(chunks, self.v, self.u, self.w, strict=True)
            ],
            dim=1,
        )  # B x H x N
        logits = logits.float().masked_fill(~mask[:, None, :], float("-inf"))  # B x H x N
        return {
            "attention": torch.softmax(logits.mean(1), dim=-1),  # B x N
            "head_attention": torch.softmax(logits, dim=-1),  # B x H x N
        }


class Cobra(nn.Module):
    """The COBRA slide encoder: input embeddings per model, sequence blocks, gated attention.

    Args:
        input_dims: feature width of every supported foundation model, by name.
        width: common width E of the embedded tiles.
        layers: sequence blocks.
        heads: attention heads (E must be a multiple).
        att_dim: hidden width of each gated-attention head.
        d_state: state size of the sequence blocks.
        proj_dim: width of the contrastive space (the projector's output).
        dropout: dropout of the input embeddings, blocks and attention.
        block: ``ssm`` (pure torch) or ``mamba2`` (``mamba_ssm``, GPU only).
    """

    def __init__(
        self,
        input_dims: dict[str, int],
        width: int = 256,
        layers: int = 2,
        heads: int = 8,
        att_dim: int = 96,
        d_state: int = 16,
        proj_dim: int = 256,
        dropout: float = 0.25,
        block: str = "ssm",
    ) -> None:
        super().__init__()
        self.input_dims = dict(input_dims)
        self.embed = nn.ModuleDict(
            {name: InputEmbed(dim, width, dropout) for name, dim in input_dims.items()}
        )
        if block == "mamba2":
            self.blocks = nn.ModuleList(Mamba2Block(width, d_state, dropout) for _ in range(layers))
        elif block == "ssm":
            self.blocks = nn.ModuleList(
                StateSpaceBlock(width, d_state, dropout=dropout) for _ in range(layers)
            )
        else:
            raise ValueError(f"block must be ssm or mamba2, not {block!r}")
        self.norm = nn.LayerNorm(width)
        self.attn = GatedAttentionHeads(width, heads, att_dim, dropout)
        self.proj = projection_mlp(width, 4 * width, proj_dim, dropout)

    def embed_tiles(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Model ``name``'s tile features (``... x N x D_m``) to ``... x N x E``."""
        if name not in self.embed:
            raise KeyError(f"no input embedding for {name!r}; known: {sorted(self.embed)}")
        return self.embed[name](x)

    def encode(self, h: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Embedded tiles ``h`` (B x N x E, in y-then-x order, padding after the valid
        tiles) and ``mask`` (B x N, True = tile) -> ``attention`` (B x N, sums to 1 over the
        valid tiles), ``head_attention`` (B x H x N) and ``embedding`` (B x E, the
        attention-weighted mean of the encoded tiles)."""
        for block in self.blocks:
            h = block(h, mask)  # B x N x E
        h = self.norm(h)  # B x N x E
        out = self.attn(h, mask)
        out["embedding"] = torch.bmm(out["attention"][:, None, :].to(h.dtype), h)[:, 0]  # B x E
        return out

    def forward(self, name: str, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x`` (B x N x D_m) of model ``name`` -> :meth:`encode`'s dict."""
        return self.encode(self.embed_tiles(name, x), mask)


class MoCoCobra(nn.Module):
    """Online COBRA + predictor and a momentum copy without gradients (MoCo v3 as COBRA).

    ``predictor=False`` drops the predictor (queries are the online projections, as in
    MoCo v1/v2): short runs converge far faster without it (see ``benchmarks/cobra.py``).
    """

    def __init__(
        self, encoder: Cobra, tau: float = 0.2, dropout: float = 0.25, predictor: bool = True
    ) -> None:
        super().__init__()
        c = encoder.proj[-1].num_features
        self.tau = tau
        self.online = encoder
        self.predictor = projection_mlp(c, 2 * c, c, dropout) if predictor else nn.Identity()
        self.momentum = copy.deepcopy(encoder)
        for p in self.momentum.parameters():
            p.requires_grad_(False)
        for module in self.momentum.modules():  # the reference's momentum copy has no dropout
            if isinstance(module, nn.Dropout):
                module.p = 0.0

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        """``theta_k <- m theta_k + (1 - m) theta_q``."""
        online = list(self.online.parameters())
        target = list(self.momentum.parameters())
        torch._foreach_mul_(target, m)
        torch._foreach_add_(target, online, alpha=1.0 - m)

    def forward(self, views1: list[View], views2: list[View], m: float) -> torch.Tensor:
        """Symmetrised MoCo v3 loss of two batches of views (view i of both is the same
        case); updates the momentum copy with momentum ``m`` first, as the reference."""
        q1 = self.predictor(
            self.online.proj(self.online.encode(*embed_views(self.online, views1))["embedding"])
        )  # B x C
        q2 = self.predictor(
            self.online.proj(self.online.encode(*embed_views(self.online, views2))["embedding"])
        )  # B x C
        with torch.no_grad():
            self.update_momentum(m)
            k1 = self.momentum.proj(
                self.momentum.encode(*embed_views(self.momentum, views1))["embedding"]
            )  # B x C
            k2 = self.momentum.proj(
                self.momentum.encode(*embed_views(self.momentum, views2))["embedding"]
            )  # B x C
        return moco_v3_loss(q1, k2, self.tau) + moco_v3_loss(q2, k1, self.tau)


#: one view of a slide: (model name, tile features N x D_m in y-then-x order)
View = tuple[str, torch.Tensor]


def embed_views(encoder: Cobra, views: list[View]) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of different models -> embedded tiles ``B x N_max x E`` (zero padding after the
    valid tiles) and ``mask`` (B x N_max, True = tile)."""
    embedded: list[torch.Tensor] = [None] * len(views)  # B x (N_i x E)
    for name in dict.fromkeys(name for name, _ in views):  # one call per model, tiles stacked
        idx = [i for i, (n, _) in enumerate(views) if n == name]
        tiles = encoder.embed_tiles(name, torch.cat([views[i][1] for i in idx]))  # sum N_i x E
        for i, part in zip(idx, tiles.split([len(views[i][1]) for i in idx]), strict=True):
            embedded[i] = part
    n_max = max(len(h) for h in embedded)
    h = torch.stack([F.pad(e, (0, 0, 0, n_max - len(e))) for e in embedded])  # B x N x E
    lengths = torch.tensor([len(e) for e in embedded], device=h.device)  # B
    mask = torch.arange(n_max, device=h.device)[None, :] < lengths[:, None]  # B x N
    return h, mask


def sort_yx(coords: np.ndarray) -> np.ndarray:
    """Indices that put tiles (``coords`` N x 2, level-0 x, y) in the sequence order:
    by y, then x."""
    coords = np.asarray(coords).reshape(-1, 2)
    return np.lexsort((coords[:, 0], coords[:, 1]))


def match_coords(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tiles common to two feature files of one slide, matched by level-0 (x, y).

    Returns index arrays ``(i, j)`` with ``source[i] == target[j]`` row by row, in the order
    of ``source``; tiles of either file without a match are left out.
    """
    where = {(int(x), int(y)): k for k, (x, y) in enumerate(np.asarray(target).reshape(-1, 2))}
    keys = [(int(x), int(y)) for x, y in np.asarray(source).reshape(-1, 2)]
    i = np.array([k for k, key in enumerate(keys) if key in where], dtype=np.int64)
    j = np.array([where[keys[k]] for k in i], dtype=np.int64)
    return i, j


def aggregate(
    attention: np.ndarray,  # N_a, sums to 1
    attention_coords: np.ndarray,  # N_a x 2
    feats: np.ndarray,  # N_b x D_b, any model's tile features of the same slide
    coords: np.ndarray,  # N_b x 2
) -> np.ndarray:
    """COBRA's slide embedding in ``feats``' space: the attention-weighted mean of ``feats``.

    The attention of tile t (computed from a supported model's features) weights the tile
    of ``feats`` at the same level-0 coordinates; tiles without a counterpart are left out
    and the weights of the matched tiles renormalised to sum to 1. Returns a ``D_b`` vector
    (float64). Raises ``ValueError`` when no tile matches.
    """
    i, j = match_coords(attention_coords, coords)
    if len(i) == 0:
        raise ValueError("no tile coordinates in common")
    w = np.asarray(attention, np.float64)[i]  # n
    total = w.sum()
    w = w / total if total > 0 else np.full(len(w), 1.0 / len(w))
    return w @ np.asarray(feats, np.float64)[j]  # D_b
