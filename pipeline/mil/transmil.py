"""TransMIL (Shao et al., NeurIPS 2021): Nystrom-attention transformer over instances with
the pyramid position encoding generator (PPEG), classifying from a class token."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.mil.base import register_mil


def iterative_pinv(x: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of softmax matrices by the iteration of Razavi et al.
    (2014), as in Nystromformer (Xiong et al., AAAI 2021)."""
    abs_x = x.abs()
    z = x.transpose(-1, -2) / (abs_x.sum(-1).amax() * abs_x.sum(-2).amax())
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iterations):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """Multi-head self-attention approximated with ``landmarks`` segment-mean landmarks
    (Nystromformer), padding-mask aware, with a depthwise convolution residual on values."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        landmarks: int = 256,
        pinv_iterations: int = 6,
        conv_kernel: int = 33,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.heads, self.landmarks, self.iterations = heads, landmarks, pinv_iterations
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * self.head_dim * heads, bias=False)
        self.out = nn.Sequential(nn.Linear(self.head_dim * heads, dim), nn.Dropout(dropout))
        self.conv = nn.Conv2d(
            heads, heads, (conv_kernel, 1), padding=(conv_kernel // 2, 0), groups=heads, bias=False
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``B x N x D`` -> (``B x N x D``, ``B x N`` attention of token 0 over all tokens).

        Sequences of at most four times the landmark count get exact attention, which is
        faster there (and what the approximation approximates)."""
        b, n, _ = x.shape
        m = self.landmarks
        exact = self.exact_is_cheaper(n)
        pad = 0 if exact else (m - n % m) % m
        if pad:  # front padding to a multiple of the landmark count
            x = F.pad(x, (0, 0, pad, 0))
            mask = F.pad(mask, (pad, 0), value=False)
        with torch.autocast(x.device.type, enabled=False):  # the pseudo-inverse needs fp32
            out, first = self._attend(self.qkv(x).float(), mask, b, m, pad, exact)
        return self.out(out), first

    def exact_is_cheaper(self, n: int) -> bool:
        """Up to four times the landmark count, exact attention is faster than the
        approximation (its pseudo-inverse costs ``~24 m^3`` per head whatever ``n``):
        measured crossover about 1,200 tokens with 256 landmarks, 512-d tokens, 8 heads
        (training step, CPU)."""
        return n <= 4 * self.landmarks

    def _attend(self, qkv: torch.Tensor, mask: torch.Tensor, b: int, m: int, pad: int, exact: bool):
        q, k, v = qkv.chunk(3, dim=-1)  # B x n' x hd each
        q, k, v = (t.reshape(b, -1, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        keep = mask[:, None, :, None].to(q.dtype)  # B x 1 x n' x 1
        q, k, v = q * keep, k * keep, v * keep
        q = q / math.sqrt(self.head_dim)
        neg = torch.finfo(q.dtype).min
        key_mask = ~mask[:, None, None, :]  # B x 1 x 1 x n'
        if exact:
            attn = torch.softmax((q @ k.transpose(-1, -2)).masked_fill(key_mask, neg), dim=-1)
            out = attn @ v + self.conv(v)  # B x h x n x d
            out = out.transpose(1, 2).reshape(b, -1, self.heads * self.head_dim)
            return out, attn[:, :, 0].mean(1)  # B x N
        seg = q.shape[2] // m
        counts = keep.reshape(b, 1, m, seg).sum(-1, keepdim=True)  # B x 1 x m x 1
        empty = (counts == 0).transpose(-1, -2)  # B x 1 x 1 x m: landmarks of padding only
        q_l = q.reshape(b, self.heads, m, seg, -1).sum(3) / counts.clamp_min(1)  # B x h x m x d
        k_l = k.reshape(b, self.heads, m, seg, -1).sum(3) / counts.clamp_min(1)
        attn1 = torch.softmax((q @ k_l.transpose(-1, -2)).masked_fill(empty, neg), dim=-1)  # n' x m
        attn2 = torch.softmax(
            (q_l @ k_l.transpose(-1, -2)).masked_fill(empty, neg), dim=-1
        )  # m x m
        attn3 = torch.softmax((q_l @ k.transpose(-1, -2)).masked_fill(key_mask, neg), dim=-1)
        middle = attn1 @ iterative_pinv(attn2, self.iterations)  # B x h x n' x m
        out = middle @ (attn3 @ v)  # B x h x n' x d
        out = out + self.conv(v)
        out = out.transpose(1, 2).reshape(b, -1, self.heads * self.head_dim)[:, pad:]
        first = (middle[:, :, pad : pad + 1] @ attn3).mean(1)[:, 0, pad:]  # B x N
        return out, first


class TransLayer(nn.Module):
    def __init__(self, dim: int, heads: int, landmarks: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads, landmarks, dropout=dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, attention = self.attn(self.norm(x), mask)
        return x + out, attention


class PPEG(nn.Module):
    """Pyramid position encoding: 7x7, 5x5 and 3x3 depthwise convolutions of the tokens laid
    out on a square grid, added to them (the class token passes through). Each bag has its
    own grid: bag ``b``'s first ``sides[b]^2`` tokens, row by row; the tokens after them
    (batch padding) pass through."""

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3)
        )

    def forward(self, x: torch.Tensor, sides: list[int]) -> torch.Tensor:
        cls, tokens = x[:, :1], x[:, 1:]  # B x 1 x D, B x L x D (L >= every side^2)
        out = tokens.clone()
        for side in sorted(set(sides)):  # the bags of one grid size together
            rows = torch.tensor([b for b, s in enumerate(sides) if s == side], device=x.device)
            cells = tokens[rows, : side * side]  # b x s^2 x D
            grid = cells.transpose(1, 2).reshape(len(rows), -1, side, side)  # b x D x s x s
            grid = grid + sum(conv(grid) for conv in self.convs)
            out[rows, : side * side] = grid.flatten(2).transpose(1, 2)
        return torch.cat([cls, out], dim=1)


@register_mil("transmil")
class TransMIL(nn.Module):
    """Two Nystrom transformer layers with a PPEG between them; logits from the class token.

    Args:
        in_dim: feature size D.
        n_classes: outputs C.
        hidden: token size.
        heads: attention heads.
        landmarks: Nystrom landmarks (256 in the paper; fewer for small bags).
        dropout: attention output dropout.

    Each bag is laid out on its own smallest square grid, ``ceil(sqrt(n))`` cells a side for
    ``n`` instances, its instances in order and then its first instances again to fill the
    grid, as in the reference implementation; so a bag's output does not depend on the other
    bags of its batch (up to the Nystrom landmarks of bags over four times the landmark
    count, which depend on the padded length). ``attention`` is the class token's
    (approximate) attention over the instances in the last layer, that of a repeated
    instance's copies summed.
    """

    head = ("classifier",)

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden: int = 512,
        heads: int = 8,
        landmarks: int = 256,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
        self.layer1 = TransLayer(hidden, heads, landmarks, dropout)
        self.ppeg = PPEG(hidden)
        self.layer2 = TransLayer(hidden, heads, landmarks, dropout)
        self.norm = nn.LayerNorm(hidden)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, features: torch.Tensor, mask: torch.Tensor, labels=None) -> dict:
        b, n, _ = features.shape
        counts = mask.sum(1)  # B: instances per bag
        # each bag's grid side, ceil(sqrt(count)) (an empty bag: one masked cell)
        sides = [math.isqrt(c - 1) + 1 if c > 0 else 1 for c in counts.tolist()]
        cells = max(s * s for s in sides)  # L: the longest grid
        # cell p of bag b holds its (p mod count)-th instance: the instances in order, then
        # the first ones again up to side^2 (fewer than count of them)
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # B x N: real first
        p = torch.arange(cells, device=mask.device)  # L
        source = order.gather(1, p % counts.clamp_min(1)[:, None])  # B x L
        areas = torch.tensor([s * s for s in sides], device=mask.device)  # B
        grid_mask = (p < areas[:, None]) & (counts[:, None] > 0)  # B x L
        h = self.embed(features)  # B x N x H
        h = h.gather(1, source[..., None].expand(-1, -1, h.shape[-1]))  # B x L x H
        h = h * grid_mask.unsqueeze(-1)  # padding zeroed
        x = torch.cat([self.cls_token.expand(b, -1, -1), h], dim=1)  # B x 1+L x H
        full_mask = torch.cat([torch.ones_like(mask[:, :1]), grid_mask], dim=1)  # B x 1+L
        x, _ = self.layer1(x, full_mask)
        x = self.ppeg(x * full_mask.unsqueeze(-1), sides)
        x, attention = self.layer2(x, full_mask)
        cls = self.norm(x)[:, 0]  # B x H
        # the class token's attention per instance: its cells' attention summed
        cell_attention = attention[:, 1:] * grid_mask  # B x L
        weights = torch.zeros_like(mask, dtype=cell_attention.dtype)  # B x N
        weights = weights.scatter_add(1, source, cell_attention) * mask
        return {"logits": self.classifier(cls), "attention": weights, "embedding": cls}
