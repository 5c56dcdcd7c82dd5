"""The demo cohorts: pyramidal Aperio-style slides built from real H&E texture.

A CAMELYON-like detection task at small scale, on tissue of many kinds. Every slide is
tissue quilted from one real *normal* texture (skin, stroma, prostate, squamous
epithelium or inflamed glands); ``tumor`` slides carry regions of one real *tumour*
texture (four tumour classes from ten images) of varied size, some only ~100-200 um
across (textures and classes: :mod:`pipeline.data.textures`). Slides vary as real
cohorts do: scanning sites with their own stain colour, background tint, resolution (20x
at ~0.5 mpp, or 40x at 0.25 mpp) and scanner, tissue pieces of varied shape, blank glass,
pen marks and debris. Patients (``case_id``) may have two slides.

Two cohorts, spatially disjoint: the *development* cohort (``demo_*`` slides, sites A-D)
is quilted only from the development blocks of every texture, the *held-out* cohort
(``held_*`` slides, other patients, sites E-F) only from the held-out blocks, so no
held-out tissue is ever seen in pretraining or training.

Outputs under ``out``::

    slides/<slide_id>.svs                  pyramidal JPEG TIFF, opens in OpenSlide as Aperio
    ground_truth/<slide_id>_{tissue,tumor,pen}.png   masks, one px = mask_downsample level-0 px
    ground_truth/<slide_id>_patches.csv    source rectangle of every quilt patch drawn
    ground_truth/<slide_id>.json           per-slide facts (cohort, textures, mpp, ...)
    labels.csv                             development slides: slide_id,case_id,label,site,time,event
    labels_heldout.csv                     every slide, with split: train (development) / test
    cohort.json                            the spec, sources, texture blocks and all records

Survival (``time`` in months, ``event`` 1 = death observed) depends on the patient's
tumour burden plus noise, so slide-level survival models have a real signal.
Everything is deterministic for a seed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from pipeline.data.sources import SOURCES, fetch_source
from pipeline.data.synth import (
    Quilt,
    SlideLayout,
    Stain,
    blob_field,
    field_masks,
    pen_stroke_field,
    render_slide,
    smooth_noise,
    stain_shift,
    to_hed,
)
from pipeline.data.textures import (
    DEVELOPMENT,
    HELD_OUT,
    NORMAL,
    TEXTURES,
    TUMOUR_CLASSES,
    load_textures,
    patch_um,
    texture_blocks,
    tumour_textures,
)
from pipeline.io import atomic_path, atomic_write_text
from pipeline.wsi.writer import pyramid_shapes, write_aperio_tiff

GENERATOR_VERSION = 2
MASK_UM_PER_PX = 8.0  # ground-truth masks: about 8 um per mask pixel


@dataclass(frozen=True)
class Site:
    """A scanning site: scanner resolution, stain protocol and glass tint."""

    name: str
    mpp: float
    magnification: int
    stain: Stain
    scanner: str


SITES = (
    Site("A", 0.5020, 20, Stain(1.00, 1.00, 1.0, (243, 242, 241)), "SS1201"),
    Site("B", 0.4990, 20, Stain(1.30, 0.75, 1.0, (238, 239, 245)), "SS2307"),
    Site("C", 0.2500, 40, Stain(0.80, 1.30, 1.0, (246, 240, 239)), "GT4500"),
    Site("D", 0.5000, 20, Stain(1.15, 1.20, 1.2, (236, 236, 231)), "SS3110"),
)
HELD_OUT_SITES = (  # the held-out cohort's own sites
    Site("E", 0.4980, 20, Stain(0.90, 0.85, 1.0, (240, 241, 238)), "SS4410"),
    Site("F", 0.2500, 40, Stain(1.20, 1.10, 1.1, (244, 238, 242)), "GT5120"),
)


@dataclass(frozen=True)
class SlidePlan:
    """What one slide will be, decided before any pixel is drawn."""

    slide_id: str
    case_id: str
    label: str  # "normal" | "tumor"
    cohort: str  # "development" | "held-out"
    normal: str  # texture of the tissue (a key of TEXTURES)
    tumour: str  # texture of the tumour regions, "" for normal slides
    site: str
    mpp: float
    magnification: int
    width_um: float
    height_um: float
    seed: int

    @property
    def width(self) -> int:
        return round(self.width_um / self.mpp)

    @property
    def height(self) -> int:
        return round(self.height_um / self.mpp)

    @property
    def mask_downsample(self) -> int:
        return max(1, round(MASK_UM_PER_PX / self.mpp))


def plan_cohort(
    n_slides: int = 32, seed: int = 0, size_scale: float = 1.0, cohort: str = DEVELOPMENT
) -> list[SlidePlan]:
    """Decide slides, patients, labels, sites and textures (balanced classes, 1/4 of
    patients with 2 slides; normal textures and tumour classes spread evenly over patients).

    ``size_scale`` multiplies the physical extent of every slide (1.0: about 2-7 mm a side).
    ``cohort``: ``development`` (``demo_*`` slides, sites A-D) or ``held-out`` (``held_*``
    slides and patients, sites E-F).
    """
    if n_slides < 2:
        raise ValueError(f"a cohort needs at least 2 slides (one per class), got {n_slides}")
    if cohort not in (DEVELOPMENT, HELD_OUT):
        raise ValueError(f"cohort must be '{DEVELOPMENT}' or '{HELD_OUT}', got '{cohort}'")
    held = cohort == HELD_OUT
    sites, prefix = (HELD_OUT_SITES, "held") if held else (SITES, "demo")
    rng = np.random.default_rng([seed, 3 if held else 1])
    n_pairs = n_slides // 4
    n_cases = n_slides - n_pairs
    slides_per_case = np.array([2] * n_pairs + [1] * (n_cases - n_pairs))
    rng.shuffle(slides_per_case)
    # Labels per patient, balanced by slide count: each patient (two-slide ones first)
    # joins the class with fewer slides so far, ties broken at random.
    case_labels = [""] * n_cases
    count = {"tumor": 0, "normal": 0}
    for case in sorted(range(n_cases), key=lambda c: (-slides_per_case[c], rng.uniform())):
        order = sorted(count, key=lambda k: (count[k], rng.uniform()))
        case_labels[case] = order[0]
        count[order[0]] += int(slides_per_case[case])
    case_sites = [sites[i % len(sites)] for i in rng.permutation(n_cases)]
    # textures per patient, balanced by slide count as the labels are: normal textures
    # over all patients, tumour classes over tumour patients (within a class, its
    # textures in turn)
    case_normal, case_tumour = [""] * n_cases, [""] * n_cases
    normal_count = dict.fromkeys(NORMAL, 0)
    class_count = dict.fromkeys(TUMOUR_CLASSES, 0)
    used = {c: int(rng.integers(0, len(tumour_textures(c)))) for c in TUMOUR_CLASSES}
    for case in sorted(range(n_cases), key=lambda c: (-slides_per_case[c], rng.uniform())):
        n = int(slides_per_case[case])
        texture = min(normal_count, key=lambda k: (normal_count[k], rng.uniform()))
        case_normal[case] = texture
        normal_count[texture] += n
        if case_labels[case] == "tumor":
            tissue = min(class_count, key=lambda k: (class_count[k], rng.uniform()))
            options = tumour_textures(tissue)
            case_tumour[case] = options[used[tissue] % len(options)]
            class_count[tissue] += n
            used[tissue] += 1

    plans = []
    for case, (label, site, count) in enumerate(
        zip(case_labels, case_sites, slides_per_case, strict=True)
    ):
        for _ in range(count):
            index = len(plans)
            big = 2.0 if site.magnification == 20 else 1.0  # 40x slides cover less tissue
            side = rng.uniform(1200.0, 3000.0, size=2) * big * size_scale
            plans.append(
                SlidePlan(
                    slide_id=f"{prefix}_{index:03d}",
                    case_id=f"{'held_' if held else ''}case_{case:03d}",
                    label=str(label),
                    cohort=cohort,
                    normal=case_normal[case],
                    tumour=case_tumour[case],
                    site=site.name,
                    mpp=site.mpp,
                    magnification=site.magnification,
                    width_um=float(np.round(side[0], 1)),
                    height_um=float(np.round(side[1], 1)),
                    seed=int(rng.integers(0, 2**31 - 1)),
                )
            )
    return plans


def make_layout(plan: SlidePlan, rng: np.random.Generator) -> SlideLayout:
    """Tissue pieces, tumour regions, pen strokes and debris of a slide, at mask resolution."""
    ds = plan.mask_downsample
    um = plan.mpp * ds  # um per mask px
    mh, mw = -(-plan.height // ds), -(-plan.width // ds)
    yy, xx = np.mgrid[0:mh, 0:mw]
    edge = np.minimum.reduce([yy, xx, mh - 1 - yy, mw - 1 - xx]).astype(np.float32)

    for _attempt in range(20):
        n_pieces = int(rng.integers(1, 4))
        tissue = np.full((mh, mw), -np.inf, np.float32)
        pieces = []
        for _ in range(n_pieces):
            center = (rng.uniform(0.3, 0.7) * mh, rng.uniform(0.3, 0.7) * mw)
            scale = rng.uniform(0.2, 0.36) / np.sqrt(n_pieces) * min(mh, mw)
            room = min(center[0], mh - center[0], center[1], mw - center[1])
            scale = min(scale, 0.6 * room)  # keep most of the piece on the glass
            radii = (scale * rng.uniform(0.6, 1.4), scale * rng.uniform(0.6, 1.4))
            wobble = smooth_noise((mh, mw), scale * rng.uniform(0.1, 0.25), rng)
            angle = rng.uniform(0.0, np.pi)
            tissue = np.maximum(tissue, blob_field((mh, mw), center, radii, angle, wobble, 0.25))
            pieces.append((center, radii, angle))
        tissue = np.minimum(tissue, (edge - 6.0) / 10.0)  # keep a glass margin at the borders
        if (tissue > 0).mean() > 0.08:
            break

    tumor = None
    if plan.label == "tumor":
        inside = np.argwhere(tissue > 0.15)
        for _attempt in range(50):
            tumor = np.full((mh, mw), -np.inf, np.float32)
            for _ in range(int(rng.integers(1, 5))):
                radius_um = float(np.exp(rng.uniform(np.log(60.0), np.log(900.0))))
                r = max(radius_um / um, 2.5)
                cy, cx = inside[rng.integers(0, len(inside))]
                wobble = smooth_noise((mh, mw), max(1.0, r / 3.0), rng)
                radii = (r * rng.uniform(0.7, 1.3), r * rng.uniform(0.7, 1.3))
                blob = blob_field((mh, mw), (cy, cx), radii, rng.uniform(0, np.pi), wobble, 0.25)
                tumor = np.maximum(tumor, blob)
            tumor = np.minimum(tumor, tissue)
            if (tumor > 0).sum() >= 3:
                break

    pen = None
    pen_color = (40, 60, 160)
    if rng.uniform() < 0.3:
        center, radii, angle = pieces[int(rng.integers(0, len(pieces)))]
        t0 = rng.uniform(0, 2 * np.pi)
        t = np.linspace(t0, t0 + rng.uniform(0.8, 2.5), 24)
        grow = rng.uniform(1.5, 1.9)
        ca, sa = np.cos(angle), np.sin(angle)
        u, v = np.cos(t) * radii[1] * grow, np.sin(t) * radii[0] * grow
        points = list(zip(center[0] + u * sa + v * ca, center[1] + u * ca - v * sa, strict=True))
        pen = pen_stroke_field((mh, mw), points, width=rng.uniform(6.0, 12.0))
        glass = tissue < -0.25  # ink only on glass, clear of the tissue border
        pen = np.where(glass, pen, 0.0).astype(np.float32)
        pen_color = [(40, 60, 160), (30, 120, 70), (35, 35, 40)][int(rng.integers(0, 3))]

    debris = []
    if rng.uniform() < 0.4:
        glass = np.argwhere(tissue < -0.5)
        for _ in range(int(rng.integers(3, 20))):
            y, x = glass[rng.integers(0, len(glass))]
            r = int(rng.integers(3, 25))
            debris.append((int(x * ds + ds // 2), int(y * ds + ds // 2), r))

    return SlideLayout(
        width=plan.width,
        height=plan.height,
        mask_downsample=ds,
        tissue_field=tissue,
        tumor_field=tumor,
        pen_field=pen,
        pen_color=pen_color,
        debris=debris,
    )


def _site(name: str) -> Site:
    return next(s for s in (*SITES, *HELD_OUT_SITES) if s.name == name)


def _resize(image: np.ndarray, factor: float) -> np.ndarray:
    if abs(factor - 1.0) < 1e-3:
        return image
    h, w = image.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


def _plan_digest(plan: SlidePlan) -> str:
    blob = json.dumps({**asdict(plan), "generator": GENERATOR_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _texture_quilt(
    name: str,
    textures: dict[str, np.ndarray],
    plan: SlidePlan,
    stain: Stain,
    rng: np.random.Generator,
) -> tuple[Quilt, list]:
    """A quilt of texture ``name`` from its blocks of the slide's cohort only, each block
    stain-shifted and resized to the slide's mpp on its own; returns the quilt and the
    blocks (:class:`pipeline.data.textures.Block`) behind its images."""
    image, spec = textures[name], TEXTURES[name]
    blocks = [b for b in texture_blocks(name, image.shape[:2]) if b.cohort == plan.cohort]
    images = [
        _resize(stain_shift(to_hed(image[b.y0 : b.y1, b.x0 : b.x1]), stain), spec.mpp / plan.mpp)
        for b in blocks
    ]
    patch = round(patch_um(name, image.shape[:2], plan.cohort) / plan.mpp)
    patch = min(patch, *(min(i.shape[:2]) for i in images))
    return Quilt(images, patch, plan.height, plan.width, rng), blocks


def _patch_rows(layer: str, quilt: Quilt, blocks: list, need: np.ndarray) -> list[list]:
    """The source rectangle (texture px: x0, y0, x1, y1, outward-rounded) of every drawn
    cell of ``quilt``, from the block and offset the quilt cut it at."""
    rows = []
    for r, c in zip(*np.nonzero(need), strict=True):
        b = blocks[quilt.block[r, c]]
        h, w = quilt.blocks[quilt.block[r, c]].shape[:2]
        sy, sx = (b.y1 - b.y0) / h, (b.x1 - b.x0) / w  # texture px per block px
        y, x = quilt.offsets[r, c]
        rect = (
            b.x0 + x * sx,
            b.y0 + y * sy,
            b.x0 + (x + quilt.patch) * sx,
            b.y0 + (y + quilt.patch) * sy,
        )
        x0, y0, x1, y1 = (round(v, 6) for v in rect)
        rows.append(
            [
                layer,
                b.texture,
                b.index,
                int(np.floor(x0)),
                int(np.floor(y0)),
                int(np.ceil(x1)),
                int(np.ceil(y1)),
            ]
        )
    return rows


def generate_slide(
    plan: SlidePlan, textures: dict[str, np.ndarray], out: str | os.PathLike
) -> dict:
    """Render, write and describe one slide; returns its ground-truth record."""
    out = Path(out)
    start = time.perf_counter()
    rng = np.random.default_rng(plan.seed)
    site = _site(plan.site)
    jitter = rng.uniform(0.92, 1.08, size=3)
    stain = Stain(
        site.stain.h * jitter[0],
        site.stain.e * jitter[1],
        site.stain.d * jitter[2],
        site.stain.background,
    )
    layout = make_layout(plan, rng)
    layers = {"normal": _texture_quilt(plan.normal, textures, plan, stain, rng)}
    if layout.tumor_field is not None:
        layers["tumor"] = _texture_quilt(plan.tumour, textures, plan, stain, rng)
    image, drawn = render_slide(
        layout, {k: q for k, (q, _) in layers.items()}, stain.background, rng
    )
    masks = field_masks(layout)

    slide_path = out / "slides" / f"{plan.slide_id}.svs"
    extra = {"ScanScope ID": site.scanner, "Filename": plan.slide_id, "Site": site.name}
    write_aperio_tiff(slide_path, image, plan.mpp, plan.magnification, extra=extra)

    gt = out / "ground_truth"
    for name, mask in masks.items():
        with atomic_path(gt / f"{plan.slide_id}_{name}.png") as tmp:
            Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
    with atomic_path(gt / f"{plan.slide_id}_patches.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["layer", "texture", "block", "x0", "y0", "x1", "y1"])
        for layer, (quilt, blocks) in layers.items():
            writer.writerows(_patch_rows(layer, quilt, blocks, drawn[layer]))
    tissue_px = int(masks["tissue"].sum())
    tumor_px = int(masks["tumor"].sum())
    record = {
        **asdict(plan),
        "normal_tissue": TEXTURES[plan.normal].tissue,
        "tumour_tissue": TEXTURES[plan.tumour].tissue if plan.tumour else "",
        "width": plan.width,
        "height": plan.height,
        "level_count": len(pyramid_shapes(plan.height, plan.width)),
        "mask_downsample": layout.mask_downsample,
        "tissue_fraction": round(tissue_px / masks["tissue"].size, 4),
        "tumor_fraction": round(tumor_px / max(tissue_px, 1), 5),
        "tumor_area_mm2": round(tumor_px * (plan.mpp * layout.mask_downsample) ** 2 / 1e6, 4),
        "has_pen": bool(masks["pen"].any()),
        "n_debris": len(layout.debris),
        "stain": [round(stain.h, 3), round(stain.e, 3), round(stain.d, 3)],
        "path": f"slides/{plan.slide_id}.svs",
        "digest": _plan_digest(plan),
        "seconds": round(time.perf_counter() - start, 2),
    }
    atomic_write_text(gt / f"{plan.slide_id}.json", json.dumps(record, indent=1))
    return record


_WORKER_TEXTURES: dict | None = None


def _init_worker(cache_dir: str) -> None:
    global _WORKER_TEXTURES
    _WORKER_TEXTURES = load_textures(cache_dir)


def _generate_in_worker(plan: SlidePlan, out: str) -> dict:
    assert _WORKER_TEXTURES is not None
    return generate_slide(plan, _WORKER_TEXTURES, out)


def _existing_record(plan: SlidePlan, out: Path) -> dict | None:
    """The saved record of a slide already generated from the same plan, else None."""
    record_path = out / "ground_truth" / f"{plan.slide_id}.json"
    slide_path = out / "slides" / f"{plan.slide_id}.svs"
    if not (record_path.exists() and slide_path.exists()):
        return None
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError:
        return None
    files_ok = all(
        (out / "ground_truth" / f"{plan.slide_id}_{m}").exists()
        for m in ("tissue.png", "tumor.png", "pen.png", "patches.csv")
    )
    return record if files_ok and record.get("digest") == _plan_digest(plan) else None


def survival_table(records: list[dict], seed: int) -> dict[str, tuple[float, int]]:
    """``{case_id: (time_months, event)}``: hazard grows with tumour burden, plus noise.

    Log-hazard = 0.8 * [tumour] + 2.0 * burden / max burden + N(0, 0.3^2); exponential
    event times with a 36-month baseline; uniform censoring between 12 and 120 months.
    """
    rng = np.random.default_rng([seed, 2])
    burden: dict[str, float] = {}
    tumor: dict[str, int] = {}
    for r in sorted(records, key=lambda r: r["slide_id"]):
        burden[r["case_id"]] = max(burden.get(r["case_id"], 0.0), r["tumor_area_mm2"])
        tumor[r["case_id"]] = max(tumor.get(r["case_id"], 0), int(r["label"] == "tumor"))
    top = max(max(burden.values()), 1e-9)
    table = {}
    for case in sorted(burden):
        log_hazard = 0.8 * tumor[case] + 2.0 * burden[case] / top + rng.normal(0.0, 0.3)
        t_event = rng.exponential(36.0 * np.exp(-log_hazard))
        t_censor = rng.uniform(12.0, 120.0)
        time_months = max(float(min(t_event, t_censor)), 0.1)  # at least one tenth of a month
        table[case] = (round(time_months, 1), int(t_event <= t_censor))
    return table


def make_cohort(
    out: str | os.PathLike = "data/demo",
    n_slides: int = 32,
    seed: int = 0,
    size_scale: float = 1.0,
    workers: int = 2,
    cache_dir: str | os.PathLike = "data/cache",
    progress: bool = True,
    n_heldout: int = 0,
) -> list[dict]:
    """Build (or complete) the demo cohorts under ``out``: ``n_slides`` development slides
    and ``n_heldout`` held-out ones (none: no held-out cohort); returns the per-slide records.

    Slides already generated from the same plan are kept; a killed run resumes.
    """
    out = Path(out)
    plans = plan_cohort(n_slides, seed, size_scale)
    if n_heldout:
        plans += plan_cohort(n_heldout, seed, size_scale, cohort=HELD_OUT)
    for name in TEXTURES:  # fail early, with a clear message, when a source is missing
        fetch_source(name, cache_dir, SOURCES)
    records = {p.slide_id: r for p in plans if (r := _existing_record(p, out)) is not None}
    todo = [p for p in plans if p.slide_id not in records]
    # Large slides first, so that the pool ends with small ones and the cores stay busy.
    todo.sort(key=lambda p: -p.width * p.height)
    bar = tqdm(
        total=len(plans),
        initial=len(records),
        unit="slide",
        disable=not progress,
        desc="demo cohort",
    )
    if todo and workers <= 1:
        textures = load_textures(cache_dir)
        for plan in todo:
            records[plan.slide_id] = generate_slide(plan, textures, out)
            bar.update()
    elif todo:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            min(workers, len(todo)), ctx, initializer=_init_worker, initargs=(str(cache_dir),)
        ) as pool:
            futures = [pool.submit(_generate_in_worker, p, str(out)) for p in todo]
            for fut in as_completed(futures):
                record = fut.result()
                records[record["slide_id"]] = record
                bar.update()
    bar.close()

    ordered = [records[p.slide_id] for p in plans]
    survival = survival_table(ordered, seed)
    fields = ["slide_id", "case_id", "label", "site", "time", "event"]

    def write_labels(path: Path, rows: list[dict], split: bool) -> None:
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(fields + ["split"] * split)
            for r in rows:
                role = ["train" if r["cohort"] == DEVELOPMENT else "test"] * split
                writer.writerow([*(r[k] for k in fields[:4]), *survival[r["case_id"]], *role])

    write_labels(out / "labels.csv", [r for r in ordered if r["cohort"] == DEVELOPMENT], False)
    if n_heldout:
        write_labels(out / "labels_heldout.csv", ordered, True)
    summary = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "n_slides": n_slides,
        "n_heldout": n_heldout,
        "size_scale": size_scale,
        "mask_um_per_px": MASK_UM_PER_PX,
        "sources": {
            k: {
                "requirement": SOURCES[k].requirement,
                "member": SOURCES[k].member,
                "sha256": SOURCES[k].sha256,
                "description": SOURCES[k].description,
            }
            for k in TEXTURES
        },
        "textures": {
            k: {
                "tissue": t.tissue,
                "role": t.role,
                "mpp": t.mpp,
                "mpp_basis": t.mpp_basis,
                "crop": t.crop,
                "blocks": [asdict(b) for b in texture_blocks(k, _texture_shape(k, cache_dir))],
            }
            for k, t in TEXTURES.items()
        },
        "sites": [
            {
                "name": s.name,
                "cohort": HELD_OUT if s in HELD_OUT_SITES else DEVELOPMENT,
                "mpp": s.mpp,
                "magnification": s.magnification,
                "stain_h": s.stain.h,
                "stain_e": s.stain.e,
            }
            for s in (*SITES, *HELD_OUT_SITES)
        ],
        "slides": ordered,
    }
    atomic_write_text(out / "cohort.json", json.dumps(summary, indent=1))
    return ordered


def _texture_shape(name: str, cache_dir: str | os.PathLike) -> tuple[int, int]:
    """Rows and columns of a texture as quilted (after its crop), read from the file's header."""
    import openslide

    crop = TEXTURES[name].crop
    if crop is not None:
        return crop[3], crop[2]
    path = fetch_source(name, cache_dir, SOURCES)
    if path.suffix == ".svs":
        with openslide.OpenSlide(str(path)) as slide:
            w, h = slide.dimensions
    else:
        with Image.open(path) as image:
            w, h = image.size
    return h, w


def cohort_is_complete(out: str | os.PathLike) -> bool:
    """True when ``out`` holds a finished cohort (its ``cohort.json`` and every slide)."""
    out = Path(out)
    try:
        summary = json.loads((out / "cohort.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return all((out / r["path"]).exists() for r in summary["slides"])


def describe_cohort(records: list[dict]) -> str:
    """A short human-readable summary of a cohort."""
    lines = []
    for cohort in (DEVELOPMENT, HELD_OUT):
        rows = [r for r in records if r.get("cohort", DEVELOPMENT) == cohort]
        if not rows:
            continue
        n = len(rows)
        tumor = sum(r["label"] == "tumor" for r in rows)
        cases = len({r["case_id"] for r in rows})
        sites = sorted({r["site"] for r in rows})
        lines.append(
            f"{cohort}: {n} slides ({tumor} tumor, {n - tumor} normal) from {cases} patients, "
            f"sites {', '.join(sites)}"
        )
    px = sum(r["width"] * r["height"] for r in records)
    sizes = [max(r["width"], r["height"]) for r in records]
    small = [r for r in records if r["label"] == "tumor" and r["tumor_area_mm2"] < 0.2]
    kinds = {r.get("normal_tissue") for r in records} | {r.get("tumour_tissue") for r in records}
    lines += [
        f"level-0 sizes {min(sizes)}-{max(sizes)} px on the long side, {px / 1e9:.2f} Gpx in all",
        f"mpp: {', '.join(sorted({str(r['mpp']) for r in records}))}; "
        f"{sum(r['has_pen'] for r in records)} slides with pen marks, "
        f"{sum(r['n_debris'] > 0 for r in records)} with debris",
        f"{len(kinds - {'', None})} tissue classes; "
        f"{len(small)} tumor slides whose tumour is under 0.2 mm^2",
    ]
    return "\n".join(lines)


def tile_labels(
    coords_dir: str | os.PathLike,
    demo_dir: str | os.PathLike,
    per_slide: int | None = None,
    seed: int = 0,
    classes: str = "tumour",
    test: str = "cv",
) -> list[dict]:
    """Labels of preprocessed demo tiles from the ground-truth masks.

    A tile is tumour when at least 90% of it lies in the tumour mask and normal when none
    of it (nor a one-mask-pixel margin) does; tiles in between are left out. ``classes``:
    ``tumour`` labels them ``tumor`` / ``normal``; ``tissue`` labels them with the tissue
    class of the slide's tumour or normal texture (skin, stroma, ..., solid_tumour).
    ``test``: ``cv`` keeps the development cohort's tiles (for cross-validation);
    ``held-out`` keeps both cohorts with a ``split`` column, ``train`` for development
    tiles and ``test`` for held-out ones; ``all`` keeps every tile, without a split.
    Rows: ``coords`` (file), ``index`` (row), ``slide_id``, ``case_id``, ``site``,
    ``cohort``, ``label`` (and ``split``). ``per_slide`` caps the tiles of each class per
    slide (a seeded sample).
    """
    from pipeline.wsi.coords import list_coords_files, read_coords

    if classes not in ("tumour", "tissue"):
        raise ValueError(f"classes must be 'tumour' or 'tissue', got '{classes}'")
    if test not in ("cv", "held-out", "all"):
        raise ValueError(f"test must be 'cv', 'held-out' or 'all', got '{test}'")
    rng = np.random.default_rng(seed)
    truth = Path(demo_dir) / "ground_truth"
    rows = []
    for path in list_coords_files(coords_dir):
        table = read_coords(path)
        slide_id = table.attrs.get("slide_id") or path.stem
        facts_file = truth / f"{slide_id}.json"
        if not facts_file.is_file():
            continue
        facts = json.loads(facts_file.read_text())
        cohort = facts.get("cohort", DEVELOPMENT)
        if test == "cv" and cohort != DEVELOPMENT:
            continue
        down = facts["mask_downsample"]
        tumor = np.array(Image.open(truth / f"{slide_id}_tumor.png")) > 0
        size = table.patch_size_level0
        if classes == "tumour":
            names = {"tumor": "tumor", "normal": "normal"}
        else:
            names = {"tumor": facts["tumour_tissue"], "normal": facts["normal_tissue"]}
        by_label: dict[str, list[int]] = {"tumor": [], "normal": []}
        for i, (x, y) in enumerate(table.coords):
            x0, y0 = int(x // down), int(y // down)
            x1, y1 = int(-(-(x + size) // down)), int(-(-(y + size) // down))
            inside = tumor[y0:y1, x0:x1]
            margin = tumor[max(0, y0 - 1) : y1 + 1, max(0, x0 - 1) : x1 + 1]
            if inside.size and inside.mean() >= 0.9:
                by_label["tumor"].append(i)
            elif not margin.any():
                by_label["normal"].append(i)
        for label, indices in by_label.items():
            if per_slide is not None and len(indices) > per_slide:
                indices = sorted(rng.choice(indices, per_slide, replace=False).tolist())
            split = {"split": "train" if cohort == DEVELOPMENT else "test"}
            rows += [
                {
                    "coords": str(path.resolve()),
                    "index": int(i),
                    "slide_id": slide_id,
                    "case_id": facts["case_id"],
                    "site": facts["site"],
                    "cohort": cohort,
                    "label": names[label],
                    **(split if test == "held-out" else {}),
                }
                for i in indices
            ]
    return rows
