"""The order in which pretraining reads tiles: a seeded, endless, slide-chunked stream.

A shuffled stream over a cohort of thousands of slides reopens a slide for almost every
tile. Here each slide visit reads ``k`` tiles: a pass over the tiles is a random order of
chunks of ``k`` tiles of one slide (a slide's last chunk wraps around to its first tiles,
so every chunk has ``k``), each slide's tiles in their own random order. Position ``p`` of
the stream maps to a tile by a pure function of ``(seed, p)`` with memory linear in the
number of slides, not of tiles: the random orders are keyed permutations (a Feistel
network with cycle walking, Black & Rogaway, "Ciphers with arbitrary finite domains",
CT-RSA 2002), computed per position, never stored. So a resumed run on any number of
devices or workers reads on exactly where it stopped, and 10^9 tiles cost no memory.
With ``k = 1`` every pass is a permutation of all tiles.

:class:`WeightedStream` draws tiles by curated sampling weights instead (``cpath curate``),
with replacement, by the same kind of pure function of ``(seed, p)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_ROUNDS = 4


def _mix(x: np.ndarray) -> np.ndarray:
    """A 64-bit integer hash (splitmix64's finaliser) of a ``uint64`` array."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A keyed pseudo-random permutation of ``range(n)``, evaluated per element in O(1)
    memory: a balanced Feistel network on the smallest even number of bits that holds
    ``n - 1``, walking cycles until the value falls below ``n`` (fewer than 4 rounds of
    walking on average, since that domain is below ``4 n``)."""

    def __init__(self, n: int, key: Sequence[int]):
        if n < 1:
            raise ValueError(f"a permutation of {n} elements")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2
        self.half = np.uint64(bits // 2)
        self.mask = np.uint64((1 << (bits // 2)) - 1)
        rng = np.random.default_rng([int(k) for k in key])
        self.keys = rng.integers(0, 2**63, size=_ROUNDS, dtype=np.uint64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & self.mask)
        return (left << self.half) | right

    def __call__(self, i: np.ndarray | int) -> np.ndarray:
        """The images of ``i`` (array of ints in ``range(n)``) under the permutation."""
        y = self._feistel(np.atleast_1d(np.asarray(i, dtype=np.uint64)))
        out = y >= self.n
        while out.any():
            y[out] = self._feistel(y[out])
            out = y >= self.n
        return y.astype(np.int64)


class TileStream:
    """Position in the stream -> tile index, for tiles grouped by slide.

    Args:
        sizes: tiles per slide; slide ``s`` owns indices ``sum(sizes[:s]) ..`` on.
        per_visit: tiles read per slide visit (``k``).
        seed: seed of all orders.
    """

    def __init__(self, sizes: Sequence[int], per_visit: int = 1, seed: int = 0):
        sizes = np.asarray(sizes, dtype=np.int64)
        if per_visit < 1 or len(sizes) == 0 or (sizes < 1).any():
            raise ValueError(f"a stream of {per_visit} tiles per visit over slides {sizes}")
        self.sizes, self.k, self.seed = sizes, int(per_visit), int(seed)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])  # first tile of each slide
        chunks = -(-sizes // self.k)  # ceil: chunks per slide
        self.chunk_ends = np.cumsum(chunks)  # chunk c belongs to the first slide with c < end
        self.chunk_starts = self.chunk_ends - chunks
        self.pass_length = int(self.chunk_ends[-1]) * self.k
        self._orders: dict[tuple[int, int], Permutation] = {}

    def _order(self, pass_: int, slide: int) -> Permutation:
        """The permutation of the chunks (``slide = -1``) or of one slide's tiles in a pass."""
        key = (pass_, slide)
        if key not in self._orders:
            if len(self._orders) > 4096:  # positions come in order: old passes are done
                self._orders.clear()
            n = int(self.chunk_ends[-1]) if slide < 0 else int(self.sizes[slide])
            self._orders[key] = Permutation(n, (self.seed, pass_, slide + 1))
        return self._orders[key]

    def __call__(self, positions: np.ndarray | Sequence[int] | int) -> np.ndarray:
        """Tile indices of stream ``positions`` (ints >= 0)."""
        p = np.atleast_1d(np.asarray(positions, dtype=np.int64))
        passes, offset = np.divmod(p, self.pass_length)
        chunk_slot, j = np.divmod(offset, self.k)
        out = np.empty_like(p)
        for pass_ in np.unique(passes):
            at = passes == pass_
            chunk = self._order(int(pass_), -1)(chunk_slot[at])  # the permuted chunk
            slide = np.searchsorted(self.chunk_ends, chunk, side="right")
            within = (chunk - self.chunk_starts[slide]) * self.k + j[at]  # slot in the slide
            tiles = np.empty_like(chunk)
            for s in np.unique(slide):
                rows = slide == s
                order = self._order(int(pass_), int(s))
                tiles[rows] = order(within[rows] % self.sizes[s])
            out[at] = self.offsets[slide] + tiles
        return out


class Positions:
    """The identity stream: position ``p`` is item ``p`` (for datasets whose items are
    already pure functions of the seed and index, as online patching's draws are)."""

    def __call__(self, positions: np.ndarray | Sequence[int] | int) -> np.ndarray:
        return np.atleast_1d(np.asarray(positions, dtype=np.int64))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def uniforms(seed: int, stream: int, counters: np.ndarray) -> np.ndarray:
    """Counter-based uniforms in ``[0, 1)``: a pure function of ``(seed, stream, counter)``
    (splitmix64 of the counter under a key of the seed and the stream id)."""
    key = _mix(np.array([(int(seed) * 0x100000001B3 + int(stream)) % 2**64], np.uint64))
    x = np.asarray(counters, np.int64).astype(np.uint64) * _GOLDEN + key  # wraps mod 2^64
    return (_mix(_mix(x)) >> np.uint64(11)).astype(np.float64) * 2.0**-53


class WeightedStream:
    """Position in the stream -> tile index, tiles drawn by weight (with replacement).

    Visit ``v`` (positions ``v k .. v k + k - 1``) picks a slide with probability
    proportional to its total weight, then each of its ``k`` positions a tile of that
    slide with probability proportional to the tile's weight, so a tile's share of the
    stream is its weight over the total. Both draws are inverse-CDF lookups
    (``searchsorted`` on cumulative weights) of counter-based uniforms of ``(seed, visit)``
    and ``(seed, position)`` (:func:`uniforms`): like :class:`TileStream`, position ``p``
    maps to a tile by a pure function of ``(seed, p)``, so a resumed run on any number of
    devices reads on exactly; memory is one float64 per tile. Tiles of weight 0 are never
    drawn.

    Args:
        sizes: tiles per slide; slide ``s`` owns indices ``sum(sizes[:s]) ..`` on.
        weights: one weight (>= 0, finite) per tile, slide by slide.
        per_visit: tiles drawn per slide visit (``k``).
        seed: seed of all draws.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        weights: np.ndarray | Sequence[float],
        per_visit: int = 1,
        seed: int = 0,
    ):
        sizes = np.asarray(sizes, dtype=np.int64)
        weights = np.asarray(weights, dtype=np.float64)
        if per_visit < 1 or len(sizes) == 0 or (sizes < 1).any():
            raise ValueError(f"a stream of {per_visit} tiles per visit over slides {sizes}")
        if len(weights) != sizes.sum():
            raise ValueError(f"{len(weights)} weights for {sizes.sum()} tiles")
        if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError("tile weights must be finite, >= 0 and not all 0")
        self.k, self.seed = int(per_visit), int(seed)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])  # first tile of each slide
        self.cum = np.cumsum(weights)  # N: mass up to and including each tile
        ends = self.cum[self.offsets[1:] - 1]  # S: mass up to each slide's last tile
        self.slide_start = np.concatenate([[0.0], ends[:-1]])  # S
        self.slide_mass = ends - self.slide_start  # S
        self.slide_cum = ends
        positive = np.flatnonzero(self.slide_mass > 0)
        self.last_slide = int(positive[-1])
        nonzero = np.flatnonzero(weights > 0)  # the last tile of weight > 0 of each slide:
        at = np.searchsorted(nonzero, self.offsets[1:], side="left") - 1  # rounding guard
        self.last_tile = nonzero[np.clip(at, 0, None)]  # S

    def __call__(self, positions: np.ndarray | Sequence[int] | int) -> np.ndarray:
        """Tile indices of stream ``positions`` (ints >= 0)."""
        p = np.atleast_1d(np.asarray(positions, dtype=np.int64))
        visit = p // self.k
        u = uniforms(self.seed, 1, visit) * self.slide_cum[-1]
        slide = np.minimum(np.searchsorted(self.slide_cum, u, side="right"), self.last_slide)
        x = self.slide_start[slide] + uniforms(self.seed, 2, p) * self.slide_mass[slide]
        tile = np.searchsorted(self.cum, x, side="right")
        return np.clip(tile, self.offsets[slide], self.last_tile[slide])
