"""The demo's real H&E textures: their tissue classes, resolutions and spatial hold-out.

Each texture is one real image of :data:`pipeline.data.sources.SOURCES` with a tissue
class (the label of the demo's tissue-type tile task), a role (``normal`` tissue fills a
slide's tissue pieces, ``tumour`` its tumour regions) and a resolution: stated by the file
(the CMU slide) or estimated from nuclear size (the others carry none).

**Spatial hold-out.** Every texture is cut into a checkerboard of 2 x 2 to 4 x 4 blocks
(:func:`texture_blocks`); blocks of one colour are *development* regions, the others
*held-out* regions. Slides of the development cohort (pretraining, MIL training) are
quilted only from development blocks, slides of the held-out cohort only from held-out
blocks. Each block is stain-shifted and resized on its own, so no pixel of one block can
reach a slide through another (not even through a resampling kernel), and every quilt
patch records the source rectangle it was cut from (``ground_truth/<slide>_patches.csv``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.data.sources import SOURCES, fetch_source

DEVELOPMENT, HELD_OUT = "development", "held-out"
COHORTS = (DEVELOPMENT, HELD_OUT)
BLOCK_UM = 300.0  # target block side; 2 to 4 blocks per axis
PATCH_UM = 128.0  # largest quilt patch side
NUCLEI = "estimated from nuclear size"


@dataclass(frozen=True)
class Texture:
    """One demo texture: source file, tissue class, role and resolution."""

    name: str  # key of SOURCES
    tissue: str  # tissue class: the label of the tile task
    role: str  # "normal" | "tumour"
    mpp: float
    mpp_basis: str
    crop: tuple[int, int, int, int] | None = None  # x, y, width, height in source px


TEXTURES: dict[str, Texture] = {
    t.name: t
    for t in (
        Texture("cmu", "skin", "normal", 0.499, "stated by the slide"),
        Texture("hgsc_stroma", "stroma", "normal", 0.25, NUCLEI),
        Texture("prostate", "prostate", "normal", 0.5, NUCLEI),
        Texture("squamous_epithelium", "squamous_epithelium", "normal", 0.25, NUCLEI),
        Texture("glands", "inflamed_glands", "normal", 0.35, NUCLEI),
        Texture("carcinoma", "carcinoma", "tumour", 0.25, NUCLEI),
        Texture("tcga_lung", "carcinoma", "tumour", 0.25, NUCLEI),
        Texture("template1", "carcinoma", "tumour", 0.5, NUCLEI),
        Texture("papillary", "carcinoma", "tumour", 1.0, "slideflow's 299 px per 302 um"),
        Texture("hgsc_nest", "serous_carcinoma", "tumour", 0.25, NUCLEI),
        # a 2 x 2 mm tissue-filled window of the TCGA frozen section
        Texture("tcga_svs", "squamous_carcinoma", "tumour", 1.0, NUCLEI, (1100, 700, 2000, 2000)),
        Texture("template2", "solid_tumour", "tumour", 0.5, NUCLEI),
        Texture("template3", "solid_tumour", "tumour", 0.5, NUCLEI),
        Texture("template4", "solid_tumour", "tumour", 0.5, NUCLEI),
        Texture("dense_tumour", "solid_tumour", "tumour", 0.5, NUCLEI),
    )
}
NORMAL = tuple(t.name for t in TEXTURES.values() if t.role == "normal")
TUMOUR_CLASSES = tuple(dict.fromkeys(t.tissue for t in TEXTURES.values() if t.role == "tumour"))
TISSUE_CLASSES = tuple(dict.fromkeys(t.tissue for t in TEXTURES.values()))


def tumour_textures(tissue: str) -> tuple[str, ...]:
    """The textures of tumour class ``tissue``."""
    return tuple(t.name for t in TEXTURES.values() if t.role == "tumour" and t.tissue == tissue)


@dataclass(frozen=True)
class Block:
    """One region of a texture, in source px (after the texture's crop): rows ``y0:y1``,
    columns ``x0:x1``, and the cohort it may be quilted into."""

    texture: str
    index: int
    y0: int
    x0: int
    y1: int
    x1: int
    cohort: str


def texture_blocks(name: str, shape: tuple[int, int]) -> list[Block]:
    """The checkerboard of a texture of ``shape`` (rows, columns) px: about
    :data:`BLOCK_UM` a side, 2 to 4 blocks per axis; block ``(i, j)`` is a development
    region when ``i + j`` is even, else held-out."""
    mpp = TEXTURES[name].mpp
    counts = [int(np.clip(round(n * mpp / BLOCK_UM), 2, 4)) for n in shape]
    ys, xs = (
        np.linspace(0, n, k + 1).round().astype(int) for n, k in zip(shape, counts, strict=True)
    )
    blocks = []
    for i in range(counts[0]):
        for j in range(counts[1]):
            cohort = DEVELOPMENT if (i + j) % 2 == 0 else HELD_OUT
            y0, x0, y1, x1 = (int(v) for v in (ys[i], xs[j], ys[i + 1], xs[j + 1]))
            blocks.append(Block(name, len(blocks), y0, x0, y1, x1, cohort))
    return blocks


def patch_um(name: str, shape: tuple[int, int], cohort: str) -> float:
    """Side of the quilt patches cut from a texture's ``cohort`` blocks: at most
    :data:`PATCH_UM`, at most 90% of the smallest block."""
    mpp = TEXTURES[name].mpp
    sides = [
        min(b.y1 - b.y0, b.x1 - b.x0) for b in texture_blocks(name, shape) if b.cohort == cohort
    ]
    return min(PATCH_UM, 0.9 * min(sides) * mpp)


def load_textures(cache_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{name: RGB uint8 image}`` of every texture (cropped where its spec says)."""
    import openslide

    out = {}
    for name, texture in TEXTURES.items():
        path = fetch_source(name, cache_dir, SOURCES)
        if path.suffix == ".svs":
            with openslide.OpenSlide(str(path)) as slide:
                x, y, w, h = texture.crop or (0, 0, *slide.dimensions)
                image = np.asarray(slide.read_region((x, y), 0, (w, h)).convert("RGB"))
        else:
            image = np.asarray(Image.open(path).convert("RGB"))
            if texture.crop is not None:
                x, y, w, h = texture.crop
                image = image[y : y + h, x : x + w]
        out[name] = np.ascontiguousarray(image)
    return out
