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

    def __init__(self, dim: int, heads: int = 8, landmarks: int = 256, pinv_iterations: int = 6,
                 conv_kernel: int = 33, dropout: float = 0.1):  # fmt: skip
        super().__init__()
        self.heads, self.landmarks, self.iterations = heads, landmarks, pinv_iterations
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * self.head_dim * heads, bias=False)
        self.out = nn.Sequential(nn.Linear(self.head_dim * heads, dim), nn.Dropout(dropout))
        self.conv = nn.Conv2d(heads, heads, (conv_kernel, 1), padding=(conv_kernel // 2, 0),
                              groups=heads, bias=False)  # fmt: skip

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

    def _attend(self, qkv: torch.Tensor, mask: torch.Tensor, b: int, m: int, pad: int,
                exact: bool):  # fmt: skip
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
    out on a square grid, added to them (the class token passes through)."""

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3)
        )

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        cls, tokens = x[:, :1], x[:, 1:]  # B x 1 x D, B x side^2 x D
        grid = tokens.transpose(1, 2).reshape(x.shape[0], -1, side, side)  # B x D x s x s
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


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

    Bags are laid out on the smallest square grid; the filler cells are masked. ``attention``
    is the class token's (approximate) attention over the instances in the last layer.
    """

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 512, heads: int = 8,
                 landmarks: int = 256, dropout: float = 0.1):  # fmt: skip
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
        side = max(1, math.ceil(math.sqrt(n)))
        h = self.embed(features) * mask.unsqueeze(-1)  # B x N x H, padding zeroed
        h = F.pad(h, (0, 0, 0, side * side - n))  # B x side^2 x H
        grid_mask = F.pad(mask, (0, side * side - n), value=False)
        x = torch.cat([self.cls_token.expand(b, -1, -1), h], dim=1)
        full_mask = torch.cat([torch.ones_like(mask[:, :1]), grid_mask], dim=1)
        x, _ = self.layer1(x, full_mask)
        x = self.ppeg(x * full_mask.unsqueeze(-1), side)
        x, attention = self.layer2(x, full_mask)
        cls = self.norm(x)[:, 0]  # B x H
        weights = attention[:, 1 : n + 1] * mask  # B x N
        return {"logits": self.classifier(cls), "attention": weights, "embedding": cls}
