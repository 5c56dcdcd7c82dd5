"""``cpath benchmark-data``: a public tile benchmark, as its authors distribute it, laid out
for ``cpath evaluate`` with the data set's official split.

    cpath benchmark-data --name crc-100k --source /downloads/crc --out /data/benchmarks/crc-100k
    cpath benchmark-data --name breakhis --source /downloads/breakhis --out OUT --fold 1

The data sets are never downloaded here: each spec says where to get them. The prepared
folder ``OUT`` holds

- ``train/<class>/<image>`` and ``test/<class>/<image>`` (PCam: also ``valid/``, which
  ``cpath evaluate`` does not read: it trains on ``train/`` and tests on ``test/``):
  symbolic links to the source images (``--link copy``: copies; PCam, distributed as HDF5
  arrays, is written as PNG files);
- ``groups.csv`` (``image,group``: the image's path under ``OUT`` and its patient or
  slide), where the source names them: give it to the task as ``groups``;
- ``dataset.json``: name, classes, counts per split and class, the native mpp and image
  size, where the split comes from, the source folder and the layout version.
  ``cpath evaluate`` reads it to set the data's mpp beside each zoo encoder's.

It is built under ``OUT.partial`` and renamed when complete; a rerun resumes an interrupted
one (PCam: by chunks) and does nothing for a finished ``OUT``.

Data sets (one :class:`DatasetSpec` each in :data:`SPECS`):

- ``crc-100k``: Kather et al. 2019, PLOS Medicine 16(1): e1002730; NCT-CRC-HE-100K (train)
  and CRC-VAL-HE-7K (test), zenodo 1214456.
- ``mhist``: Wei et al. 2021, "A Petri Dish for Histopathology Image Analysis"
  (arXiv:2101.12355); the ``Partition`` column of ``annotations.csv``.
- ``bach``: Aresta et al. 2019, "BACH: Grand challenge on breast cancer histology images",
  Medical Image Analysis 56; the test labels are not public, so the 400 labelled photos are
  split as kaiko-ai/eva does (``BACH`` dataset class: fixed index ranges chosen to keep each
  patient on one side; 268 train, 132 test).
- ``pcam``: Veeling et al. 2018, "Rotation Equivariant CNNs for Digital Pathology", MICCAI
  2018; the distributed train / valid / test files.
- ``breakhis``: Spanhol et al. 2016, "A Dataset for Breast Cancer Histopathological Image
  Classification", IEEE TBME 63(7); the authors' five 70/30 patient-level folds
  (``dsfold1.txt`` .. ``dsfold5.txt``), or with ``--split patients`` a deterministic
  patient-level 70/30 split made here.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.errors import ConfigError, PipelineError

LAYOUT_VERSION = 1
PCAM_CHUNK = 4096  # PCam rows written (and marked done) at a time
log = logging.getLogger(__name__)


@dataclass
class BenchmarkDataConfig:
    """Lay out a public tile benchmark, as downloaded from its authors, for `cpath evaluate`
    (train/ and test/ class folders, groups.csv, dataset.json), with its official split.

    Args:
        name: the data set: crc-100k, mhist, bach, pcam or breakhis.
        source: the folder the data set was downloaded and extracted into (`cpath
            benchmark-data --name NAME` without a valid source says what it must hold).
        out: the prepared folder (built as OUT.partial, then renamed).
        link: symlink (default: links to the source images) or copy.
        split: official (the data set's own split; BreakHis: the authors' fold file
            dsfoldN.txt in the source) or patients (BreakHis only: a deterministic
            patient-level 70/30 split made here, when the fold files are not at hand).
        fold: BreakHis: which of the authors' five folds (1-5).
        labels: BreakHis: binary (benign / malignant) or subtype (the 8 tumour types).
        magnification: BreakHis: only images at 40X, 100X, 200X or 400X (default: all).
        train_set: CRC-100K: NCT-CRC-HE-100K (Macenko-normalised, default when present) or
            NCT-CRC-HE-100K-NONORM.
        progress: show a progress bar.
    """

    name: str = ""
    source: Path = Path(".")
    out: Path = Path("data/benchmarks")
    link: str = "symlink"
    split: str = "official"
    fold: int = 1
    labels: str = "binary"
    magnification: str | None = None
    train_set: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class DatasetSpec:
    """A public tile benchmark: what it holds and where its split comes from.

    Args:
        name: the ``--name`` of the data set.
        title: its name as its authors give it.
        classes: class folders of the prepared layout (default labels).
        mpp: native microns per pixel of the images (None: mixed, see ``mpp_by``).
        mpp_note: where the mpp comes from.
        approximate: True when no source states the mpp exactly.
        image_px: width, height of the images.
        split: where the official split comes from.
        layout: the expected source layout (shown when the source is wrong).
        download: where to download it, and its licence.
        citation: the paper to cite.
        prepare: name of the preparer function.
        mpp_by: mpp per magnification, for data sets that mix several.
    """

    name: str
    title: str
    classes: tuple[str, ...]
    mpp: float | None
    mpp_note: str
    approximate: bool
    image_px: tuple[int, int]
    split: str
    layout: str
    download: str
    citation: str
    prepare: str
    mpp_by: dict[str, float] = field(default_factory=dict)


CRC_CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
BACH_CLASSES = ("Benign", "InSitu", "Invasive", "Normal")
# kaiko-ai/eva, eva.vision.data.datasets.classification.bach: [start, end) indices into the
# 400 photos ordered by class (Benign, InSitu, Invasive, Normal), then by file name
BACH_TRAIN_RANGES = ((0, 41), (59, 60), (90, 139), (169, 240), (258, 260), (273, 345), (368, 400))
BACH_TEST_RANGES = ((41, 59), (60, 90), (139, 169), (240, 258), (260, 273), (345, 368))
BREAKHIS_SUBTYPES = {
    "A": "adenosis",
    "F": "fibroadenoma",
    "PT": "phyllodes_tumor",
    "TA": "tubular_adenoma",
    "DC": "ductal_carcinoma",
    "LC": "lobular_carcinoma",
    "MC": "mucinous_carcinoma",
    "PC": "papillary_carcinoma",
}
BREAKHIS_NAME = re.compile(r"^SOB_([BM])_([A-Z]+)-(\d+-[0-9A-Za-z]+)-(\d+)-(\d+)\.png$")
# BreakHis magnification factors are objective x 10x eyepiece (40X: a 4x objective); the
# paper states no pixel size: these are estimates from its optics (3.3x relay lens onto a
# 1/3-inch PAL CCD, ~6.4 um pixels)
BREAKHIS_MPP = {"40X": 0.49, "100X": 0.19, "200X": 0.097, "400X": 0.049}

SPECS: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        DatasetSpec(
            name="crc-100k",
            title="NCT-CRC-HE-100K / CRC-VAL-HE-7K",
            classes=CRC_CLASSES,
            mpp=0.5,
            mpp_note="0.5 um/px (20x), as the data set's description states",
            approximate=False,
            image_px=(224, 224),
            split="folders: NCT-CRC-HE-100K (train) and CRC-VAL-HE-7K (test, 7,180 "
            "images of 50 patients without overlap with the training set)",
            layout="SOURCE/NCT-CRC-HE-100K/<class>/*.tif (or NCT-CRC-HE-100K-NONORM/) and "
            "SOURCE/CRC-VAL-HE-7K/<class>/*.tif, classes " + " ".join(CRC_CLASSES),
            download="https://zenodo.org/records/1214456 (NCT-CRC-HE-100K.zip, "
            "CRC-VAL-HE-7K.zip; CC BY 4.0)",
            citation="Kather JN et al. Predicting survival from colorectal cancer histology "
            "slides using deep learning: a retrospective multicenter study. PLOS Medicine "
            "16(1): e1002730, 2019",
            prepare="prepare_crc",
        ),
        DatasetSpec(
            name="mhist",
            title="MHIST",
            classes=("HP", "SSA"),
            mpp=1.25,
            mpp_note="approximate: MHIST is described at 8x, taken as 1.25 um/px (a 40x "
            "scan at 0.25 um/px, downsampled 5x); kaiko-ai/eva's documentation has listed "
            "0.25 and later 2.0 (5x)",
            approximate=True,
            image_px=(224, 224),
            split="annotations.csv, column Partition (train / test)",
            layout="SOURCE/annotations.csv (columns Image Name, Majority Vote Label, "
            "Partition) and SOURCE/images/*.png (images.zip extracted)",
            download="https://bmirds.github.io/MHIST/ (form, then e-mailed links; "
            "Dataset Research Use Agreement)",
            citation="Wei J et al. A Petri Dish for Histopathology Image Analysis. "
            "arXiv:2101.12355, 2021",
            prepare="prepare_mhist",
        ),
        DatasetSpec(
            name="bach",
            title="BACH (ICIAR 2018), microscopy photos",
            classes=BACH_CLASSES,
            mpp=0.42,
            mpp_note="0.42 um/px, as the data set's description states",
            approximate=False,
            image_px=(2048, 1536),
            split="kaiko-ai/eva's fixed split of the 400 labelled photos (class BACH: "
            "index ranges chosen to keep each patient on one side; 268 train, 132 test); "
            "the challenge's test labels are not public",
            layout="SOURCE/ICIAR2018_BACH_Challenge/Photos/{Benign,InSitu,Invasive,Normal}/"
            "*.tif (100 each)",
            download="https://zenodo.org/records/3632035 (ICIAR2018_BACH_Challenge.zip; "
            "CC BY-NC-ND 4.0)",
            citation="Aresta G et al. BACH: Grand challenge on breast cancer histology "
            "images. Medical Image Analysis 56: 122-139, 2019",
            prepare="prepare_bach",
        ),
        DatasetSpec(
            name="pcam",
            title="PatchCamelyon",
            classes=("normal", "tumour"),
            mpp=0.972,
            mpp_note="approximate: level 2 of Camelyon16 slides scanned at ~0.243 um/px "
            "(10x, about 0.97 um/px)",
            approximate=True,
            image_px=(96, 96),
            split="the distributed files: camelyonpatch_level_2_split_{train,valid,test}_*",
            layout="SOURCE/camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5 "
            "(gunzipped), optionally camelyonpatch_level_2_split_{split}_meta.csv",
            download="https://zenodo.org/records/2546921 (CC0 1.0)",
            citation="Veeling BS et al. Rotation Equivariant CNNs for Digital Pathology. "
            "MICCAI 2018",
            prepare="prepare_pcam",
        ),
        DatasetSpec(
            name="breakhis",
            title="BreaKHis v1",
            classes=("benign", "malignant"),
            mpp=None,
            mpp_note="approximate, per magnification: estimated from the paper's optics "
            "(the authors state no pixel size; kaiko-ai/eva lists 0.25 um/px at 40X)",
            approximate=True,
            image_px=(700, 460),
            split="the authors' patient-level 70/30 folds dsfold1.txt .. dsfold5.txt "
            "(--fold N), or --split patients: a deterministic patient-level 70/30 split",
            layout="SOURCE/BreaKHis_v1/histology_slides/breast/{benign,malignant}/SOB/"
            "<tumour type>/<patient>/<40X|100X|200X|400X>/*.png, and for --split "
            "official the authors' SOURCE/dsfoldN.txt (lines file|mag|group|train or test)",
            download="https://web.inf.ufpr.br/vri/databases/breast-cancer-histopathological-"
            "database-breakhis/ (BreaKHis_v1.tar.gz; CC BY 4.0)",
            citation="Spanhol FA et al. A Dataset for Breast Cancer Histopathological Image "
            "Classification. IEEE Transactions on Biomedical Engineering 63(7): 1455-1462, "
            "2016",
            prepare="prepare_breakhis",
            mpp_by=BREAKHIS_MPP,
        ),
    )
}


@dataclass
class Item:
    """One image of the prepared layout: its split, class, source file and group."""

    split: str
    label: str
    source: Path
    group: str | None = None

    @property
    def image(self) -> str:
        return f"{self.split}/{self.label}/{self.source.name}"


@dataclass
class Plan:
    """What a preparer found: the images and facts for ``dataset.json``."""

    items: list[Item]
    split_source: str
    groups_by: str | None = None  # patient or slide, when items have groups
    facts: dict = field(default_factory=dict)


# ---------------------------------------------------------------- source checks


def _missing(spec: DatasetSpec, what: Path, detail: str = "") -> PipelineError:
    return PipelineError(
        f"{spec.title}: {what} not found{detail}. Expected layout: {spec.layout}. "
        f"Download it from {spec.download} and give its folder as --source."
    )


def _need_dir(spec: DatasetSpec, path: Path) -> Path:
    if not path.is_dir():
        raise _missing(spec, path)
    return path


def _need_file(spec: DatasetSpec, path: Path) -> Path:
    if not path.is_file():
        raise _missing(spec, path)
    return path


def _class_images(spec: DatasetSpec, folder: Path, classes, suffix: str) -> dict[str, list]:
    """``{class: sorted image files}`` of ``folder/<class>/*suffix``; every class must be
    there with at least one image."""
    found = {}
    for c in classes:
        files = sorted(
            p for p in _need_dir(spec, folder / c).iterdir() if p.suffix.lower() == suffix
        )
        if not files:
            raise _missing(spec, folder / c / f"*{suffix}", " (the class folder is empty)")
        found[c] = files
    return found


# ---------------------------------------------------------------- preparers


def prepare_crc(source: Path, cfg: BenchmarkDataConfig, spec: DatasetSpec) -> Plan:
    """NCT-CRC-HE-100K (or -NONORM) -> train, CRC-VAL-HE-7K -> test (Kather et al. 2019);
    the source names no patients."""
    names = ("NCT-CRC-HE-100K", "NCT-CRC-HE-100K-NONORM")
    if cfg.train_set is not None and cfg.train_set not in names:
        raise ConfigError(f"--train_set {cfg.train_set}: one of {', '.join(names)}")
    train = cfg.train_set or next((n for n in names if (source / n).is_dir()), names[0])
    items = []
    for role, folder in (("train", train), ("test", "CRC-VAL-HE-7K")):
        for label, files in _class_images(spec, source / folder, CRC_CLASSES, ".tif").items():
            items += [Item(role, label, f) for f in files]
    return Plan(items, f"folders: {train} (train), CRC-VAL-HE-7K (test)", facts={"train": train})


def prepare_mhist(source: Path, cfg: BenchmarkDataConfig, spec: DatasetSpec) -> Plan:
    """``annotations.csv``: label ``Majority Vote Label``, split ``Partition`` (Wei et al.
    2021); the source names no patients."""
    table = _need_file(spec, source / "annotations.csv")
    images = _need_dir(spec, source / "images")
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    need = ("Image Name", "Majority Vote Label", "Partition")
    if not rows or any(c not in rows[0] for c in need):
        raise PipelineError(
            f"{table}: expected columns {', '.join(need)} (the MHIST annotations file)"
        )
    items = []
    for r in rows:
        label, role = r["Majority Vote Label"].strip(), r["Partition"].strip()
        if label not in spec.classes or role not in ("train", "test"):
            raise PipelineError(
                f"{table}: row {r['Image Name']}: label {label!r} (HP or SSA), "
                f"Partition {role!r} (train or test)"
            )
        items.append(Item(role, label, images / r["Image Name"].strip()))
    lost = [i.source.name for i in items if not i.source.is_file()]
    if lost:
        raise _missing(spec, images / lost[0], f" ({len(lost)} images of annotations.csv lack)")
    return Plan(items, "annotations.csv, column Partition")


def bach_split(photos: dict[str, list[Path]]) -> dict[Path, str]:
    """``{photo: train | test}``: kaiko-ai/eva's index ranges over the 400 photos ordered by
    class name, then by file name."""
    ordered = [p for c in sorted(photos) for p in sorted(photos[c], key=lambda p: p.name)]
    if len(ordered) != 400:
        raise PipelineError(
            f"BACH: {len(ordered)} photos in {ordered[0].parent.parent if ordered else '?'}; "
            "the fixed split needs the 400 labelled photos of ICIAR2018_BACH_Challenge.zip"
        )
    roles = {}
    for role, ranges in (("train", BACH_TRAIN_RANGES), ("test", BACH_TEST_RANGES)):
        for i in (i for start, end in ranges for i in range(start, end)):
            if roles.setdefault(ordered[i], role) != role:
                raise ValueError(f"BACH split: photo {i} in both train and test ranges")
    if len(roles) != len(ordered):
        raise ValueError("BACH split: the train and test ranges do not cover the 400 photos")
    return roles


def prepare_bach(source: Path, cfg: BenchmarkDataConfig, spec: DatasetSpec) -> Plan:
    """The 400 labelled photos, split as kaiko-ai/eva does (Aresta et al. 2019)."""
    photos = source / "ICIAR2018_BACH_Challenge" / "Photos"
    if not photos.is_dir() and (source / "Photos").is_dir():
        photos = source / "Photos"
    found = _class_images(spec, _need_dir(spec, photos), BACH_CLASSES, ".tif")
    roles = bach_split(found)
    items = [Item(roles[p], c, p) for c, files in found.items() for p in files]
    return Plan(items, "kaiko-ai/eva BACH index ranges (268 train, 132 test)")


def _pcam_file(spec: DatasetSpec, source: Path, role: str, part: str) -> Path:
    path = source / f"camelyonpatch_level_2_split_{role}_{part}.h5"
    if not path.is_file() and path.with_suffix(".h5.gz").is_file():
        raise PipelineError(f"{path}.gz: decompress it first (gunzip {path}.gz)")
    return _need_file(spec, path)


def prepare_pcam(source: Path, cfg: BenchmarkDataConfig, spec: DatasetSpec) -> Plan:
    """Checks the PCam files; the images are written by :func:`write_pcam`."""
    counts = {}
    import h5py

    for role in ("train", "valid", "test"):
        x, y = (_pcam_file(spec, source, role, p) for p in ("x", "y"))
        with h5py.File(x, "r") as fx, h5py.File(y, "r") as fy:
            if "x" not in fx or "y" not in fy or len(fx["x"]) != len(fy["y"]):
                raise PipelineError(
                    f"{x}, {y}: expected datasets x (N x 96 x 96 x 3) and y (N labels) "
                    "of equal length"
                )
            counts[role] = len(fx["x"])
    metas = [source / f"camelyonpatch_level_2_split_{r}_meta.csv" for r in counts]
    groups = "slide" if all(m.is_file() for m in metas) else None
    return Plan([], spec.split, groups_by=groups, facts={"rows": counts})


def _breakhis_root(spec: DatasetSpec, source: Path) -> Path:
    for root in (source / "BreaKHis_v1", source, source / "BreaKHis_v1" / "BreaKHis_v1"):
        if (root / "histology_slides" / "breast").is_dir():
            return root / "histology_slides" / "breast"
    raise _missing(spec, source / "BreaKHis_v1" / "histology_slides" / "breast")


def breakhis_images(spec: DatasetSpec, source: Path) -> dict[str, tuple[Path, re.Match]]:
    """``{file name: (path, parsed name)}`` of every BreakHis image under ``source``."""
    breast = _breakhis_root(spec, source)
    found = {}
    for path in sorted(breast.glob("*/SOB/*/*/*/*.png")):
        m = BREAKHIS_NAME.match(path.name)
        if m is None:
            log.warning("%s: not a BreakHis image name (SOB_B_A-14-22549AB-40-001.png)", path)
            continue
        found[path.name] = (path, m)
    if not found:
        raise _missing(spec, breast / "benign" / "SOB", " (no images)")
    return found


def _fold_file(spec: DatasetSpec, source: Path, fold: int) -> Path:
    name = f"dsfold{fold}.txt"
    places = (source, source / "mkfold", source / "BreaKHis_v1", source / "BreaKHis_v1/mkfold")
    for where in places:
        if (where / name).is_file():
            return where / name
    raise PipelineError(
        f"BreakHis: {source / name} not found (the authors' fold file, lines "
        "file|magnification|group|train or test). Put dsfold1.txt .. dsfold5.txt, as the "
        "authors distribute them, in the source folder, or pass --split patients for a "
        "deterministic patient-level 70/30 split made here (not the authors' folds)."
    )


def read_fold(path: Path) -> dict[str, str]:
    """``{file name: train | test}`` of a BreakHis fold file (``name|mag|group|role``)."""
    roles = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split("|")]
        if len(parts) < 4 or parts[3] not in ("train", "test"):
            raise PipelineError(f"{path}:{n}: expected file|magnification|group|train or test")
        roles[parts[0]] = parts[3]
    return roles


def patient_split(patients: dict[str, str], train: float = 0.7) -> dict[str, str]:
    """``{patient: train | test}``: per class (``patients``: patient -> class), the
    patients ordered by a hash of their id, the first 70% (rounded) to train."""
    roles = {}
    for label in sorted(set(patients.values())):
        ids = sorted(
            (p for p, c in patients.items() if c == label),
            key=lambda p: hashlib.sha256(p.encode()).hexdigest(),
        )
        n_train = max(1, round(train * len(ids))) if len(ids) > 1 else len(ids)
        roles.update({p: "train" if i < n_train else "test" for i, p in enumerate(ids)})
    return roles


def prepare_breakhis(source: Path, cfg: BenchmarkDataConfig, spec: DatasetSpec) -> Plan:
    """BreakHis with the authors' fold ``--fold`` or a patient-level split (Spanhol et al.
    2016); groups: the patient id of each file name (``14-22549AB``)."""
    if cfg.labels not in ("binary", "subtype"):
        raise ConfigError(f"--labels {cfg.labels}: binary or subtype")
    mags = ("40X", "100X", "200X", "400X")
    if cfg.magnification is not None and cfg.magnification.upper() not in mags:
        raise ConfigError(f"--magnification {cfg.magnification}: one of {', '.join(mags)}")
    images = breakhis_images(spec, source)
    mag = cfg.magnification.upper() if cfg.magnification else None
    images = {k: v for k, v in images.items() if mag is None or f"{v[1].group(4)}X" == mag}

    def label(m: re.Match) -> str:
        if cfg.labels == "subtype":
            return BREAKHIS_SUBTYPES.get(m.group(2), m.group(2))
        return "benign" if m.group(1) == "B" else "malignant"

    if cfg.split == "official":
        if not 1 <= cfg.fold <= 5:
            raise ConfigError(f"--fold {cfg.fold}: 1 to 5 (the authors' five folds)")
        fold = _fold_file(spec, source, cfg.fold)
        listed = read_fold(fold)
        lost = sorted(
            n for n in listed if n not in images and (mag is None or f"-{mag[:-1]}-" in n)
        )
        if lost:
            raise _missing(spec, Path(lost[0]), f" ({len(lost)} images of {fold} lack)")
        extra = sorted(set(images) - set(listed))
        if extra:
            log.warning("BreakHis: %d images not in %s, left out (%s)", len(extra), fold, extra[0])
        roles = {n: listed[n] for n in images if n in listed}
        how = f"the authors' fold file {fold.name}"
    else:
        patients = {m.group(3): label(m) for _, m in images.values()}
        by_patient = patient_split(patients)
        roles = {n: by_patient[m.group(3)] for n, (_, m) in images.items()}
        how = "deterministic patient-level 70/30 split per class (sha256 order of patient ids)"
    items = [Item(roles[n], label(m), p, m.group(3)) for n, (p, m) in images.items() if n in roles]
    sides: dict[str, set] = {}
    for i in items:
        sides.setdefault(i.group, set()).add(i.split)
    both = sorted(p for p, s in sides.items() if len(s) > 1)
    if both:
        log.warning(
            "BreakHis: %d patient ids on both sides of %s (%s); groups.csv keeps each id one "
            "group (in the authors' folds, 14-13412 names a ductal and a lobular carcinoma "
            "folder, on either side)",
            len(both),
            how,
            ", ".join(both),
        )
    facts = {
        "labels": cfg.labels,
        "magnification": mag or "all",
        "patients_on_both_sides": both,
    }
    if cfg.split == "official":
        facts["fold"] = cfg.fold
    return Plan(items, how, groups_by="patient", facts=facts)


# ---------------------------------------------------------------- writers


def _place(item: Item, root: Path, link: str) -> None:
    target = root / item.image
    if target.is_symlink() or target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    if link == "copy":
        shutil.copy2(item.source, tmp)
    else:
        os.symlink(item.source.resolve(), tmp)
    os.replace(tmp, target)


def write_files(plan: Plan, root: Path, cfg: BenchmarkDataConfig) -> None:
    """Link (or copy) every image of ``plan`` into ``root``; ones already there are kept."""
    from tqdm import tqdm

    names = Counter(i.image for i in plan.items)
    twice = [n for n, k in names.items() if k > 1]
    if twice:
        raise PipelineError(f"two source images would both be {twice[0]}")
    for item in tqdm(plan.items, desc=cfg.name, unit="image", disable=not cfg.progress):
        _place(item, root, cfg.link)


def _pcam_groups(source: Path, role: str, n: int) -> list[str] | None:
    meta = source / f"camelyonpatch_level_2_split_{role}_meta.csv"
    if not meta.is_file():
        return None
    with open(meta, newline="") as f:
        rows = list(csv.DictReader(f))
    if len(rows) != n or (rows and "wsi" not in rows[0]):
        raise PipelineError(f"{meta}: expected {n} rows with a wsi column (the patch's slide)")
    return [r["wsi"] for r in rows]


def pcam_name(role: str, index: int) -> str:
    """The PNG file name of row ``index`` of PCam split ``role``."""
    return f"pcam_{role}_{index:06d}.png"


def write_pcam(source: Path, root: Path, cfg: BenchmarkDataConfig, plan: Plan) -> list[Item]:
    """Every PCam row as ``root/<split>/<normal|tumour>/pcam_<split>_<row>.png``, in chunks
    of :data:`PCAM_CHUNK` rows; a chunk done (``root/.chunks/``) is skipped on a rerun."""
    import h5py
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    classes = SPECS["pcam"].classes
    done = root / ".chunks"
    done.mkdir(parents=True, exist_ok=True)
    items = []
    total = sum(plan.facts["rows"].values())
    bar = tqdm(total=total, desc="pcam", unit="image", disable=not cfg.progress)
    for role, n in plan.facts["rows"].items():
        groups = _pcam_groups(source, role, n)
        x_path, y_path = (source / f"camelyonpatch_level_2_split_{role}_{p}.h5" for p in "xy")
        with h5py.File(x_path, "r") as fx, h5py.File(y_path, "r") as fy:
            labels = np.asarray(fy["y"]).reshape(n)
            for start in range(0, n, PCAM_CHUNK):
                end = min(n, start + PCAM_CHUNK)
                marker = done / f"{role}-{start:06d}"
                if not marker.is_file():
                    block = np.asarray(fx["x"][start:end])
                    for k, image in enumerate(block):
                        path = root / role / classes[int(labels[start + k])]
                        path.mkdir(parents=True, exist_ok=True)
                        Image.fromarray(image).save(path / pcam_name(role, start + k))
                    marker.touch()
                bar.update(end - start)
        items += [
            Item(
                role,
                classes[int(labels[i])],
                Path(pcam_name(role, i)),
                None if groups is None else groups[i],
            )
            for i in range(n)
        ]
    bar.close()
    shutil.rmtree(done)
    return items


# ---------------------------------------------------------------- run


def _options(cfg: BenchmarkDataConfig) -> dict:
    keep = {"link", "split"}
    if cfg.name == "breakhis":
        keep |= {"labels", "magnification"} | ({"fold"} if cfg.split == "official" else set())
    if cfg.name == "crc-100k":
        keep.add("train_set")
    return {k: v for k, v in asdict(cfg).items() if k in keep}


def _describe(spec: DatasetSpec, cfg: BenchmarkDataConfig, source: Path, plan: Plan) -> dict:
    counts: dict[str, dict[str, int]] = {}
    for item in plan.items:
        by_class = counts.setdefault(item.split, {})
        by_class[item.label] = by_class.get(item.label, 0) + 1
    classes = sorted({i.label for i in plan.items})
    mag = plan.facts.get("magnification")
    mpp = spec.mpp_by.get(mag, spec.mpp) if spec.mpp_by else spec.mpp
    return {
        "name": spec.name,
        "title": spec.title,
        "classes": classes,
        "counts": {s: dict(sorted(counts[s].items())) for s in sorted(counts)},
        "n_images": len(plan.items),
        "mpp": mpp,
        "mpp_approximate": spec.approximate,
        "mpp_note": spec.mpp_note,
        **({"mpp_by_magnification": spec.mpp_by} if spec.mpp_by else {}),
        "image_px": list(spec.image_px),
        "split_source": plan.split_source,
        "groups": "groups.csv" if plan.groups_by else None,
        "groups_by": plan.groups_by,
        "source": str(source),
        "options": _options(cfg),
        **{k: v for k, v in plan.facts.items() if k != "rows"},
        "download": spec.download,
        "citation": spec.citation,
        "layout_version": LAYOUT_VERSION,
    }


def _write_groups(path: Path, items: list[Item]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "group"])
        w.writerows((i.image, i.group) for i in items)


def _finished(out: Path, cfg: BenchmarkDataConfig) -> bool:
    """True when ``out`` already holds this data set with these options; an error when it
    holds something else."""
    meta = out / "dataset.json"
    if not meta.is_file():
        if out.exists() and any(out.iterdir()):
            raise PipelineError(
                f"{out}: exists and is not a prepared data set (no dataset.json); "
                "give another --out or remove it"
            )
        return False
    done = json.loads(meta.read_text())
    same = (done.get("name"), done.get("options"), done.get("layout_version")) == (
        cfg.name,
        _options(cfg),
        LAYOUT_VERSION,
    )
    if not same:
        raise PipelineError(
            f"{out}: already holds {done.get('name')} with options {done.get('options')} "
            f"(layout {done.get('layout_version')}); give another --out for {cfg.name} "
            f"with {_options(cfg)}, or remove it"
        )
    return True


def _resume(partial: Path, cfg: BenchmarkDataConfig) -> None:
    """Create ``partial``, or keep what an interrupted run with the same options wrote."""
    stamp = partial / ".options.json"
    wanted = json.dumps({"name": cfg.name, **_options(cfg), "layout": LAYOUT_VERSION})
    if partial.is_dir() and (not stamp.is_file() or stamp.read_text() != wanted):
        log.warning("%s: left by a run with other options; starting again", partial)
        shutil.rmtree(partial)
    elif partial.is_dir():
        log.info("%s: resuming an interrupted run", partial)
    partial.mkdir(parents=True, exist_ok=True)
    stamp.write_text(wanted)


def prepare(cfg: BenchmarkDataConfig) -> dict:
    """Prepare ``cfg.name`` from ``cfg.source`` into ``cfg.out``; returns ``dataset.json``."""
    spec = SPECS.get(cfg.name)
    if spec is None:
        raise ConfigError(f"--name {cfg.name!r}: one of {', '.join(SPECS)}")
    if cfg.link not in ("symlink", "copy"):
        raise ConfigError(f"--link {cfg.link}: symlink or copy")
    if cfg.split not in ("official", "patients") or (
        cfg.split == "patients" and cfg.name != "breakhis"
    ):
        raise ConfigError(f"--split {cfg.split}: official (patients: BreakHis only)")
    source, out = Path(cfg.source).resolve(), Path(cfg.out)
    if _finished(out, cfg):
        log.info("%s: %s is already prepared; nothing to do", out, cfg.name)
        return json.loads((out / "dataset.json").read_text())
    if not source.is_dir():
        raise _missing(spec, source)
    plan = PREPARERS[cfg.name](source, cfg, spec)
    partial = out.with_name(out.name + ".partial")
    _resume(partial, cfg)
    if cfg.name == "pcam":
        plan.items = write_pcam(source, partial, cfg, plan)
    else:
        write_files(plan, partial, cfg)
    if plan.groups_by:
        _write_groups(partial / "groups.csv", plan.items)
    meta = _describe(spec, cfg, source, plan)
    (partial / "dataset.json").write_text(json.dumps(meta, indent=1) + "\n")
    (partial / ".options.json").unlink()
    if out.exists():
        out.rmdir()  # empty (checked by _finished)
    os.replace(partial, out)
    return meta


def run(cfg: BenchmarkDataConfig) -> int:
    out = Path(cfg.out)
    already = (out / "dataset.json").is_file()
    meta = prepare(cfg)
    if already:
        print(f"benchmark-data: {out} already holds {meta['name']}; nothing to do")
        return 0
    counts = ", ".join(f"{s} {sum(c.values())}" for s, c in meta["counts"].items())
    mpp = "mixed" if meta["mpp"] is None else f"{meta['mpp']}"
    print(
        f"benchmark-data: {meta['name']} in {out} ({counts}; {len(meta['classes'])} classes, "
        f"{mpp} um/px{' approx.' if meta['mpp_approximate'] else ''}); split: "
        f"{meta['split_source']}"
    )
    groups = f", groups: {out / 'groups.csv'}" if meta["groups"] else ""
    print(f"  suite task: {{name: {meta['name']}, kind: tile, data: {out}{groups}}}")
    return 0


# ---------------------------------------------------------------- evaluation


def data_resolution(data, encoders: dict[str, str], warn: bool = True) -> dict | None:
    """The native mpp of a prepared tile folder ``data`` (its ``dataset.json``; None if it
    has none) and, per zoo encoder of ``encoders`` (name -> spec ``KEY`` or ``KEY:MODE``),
    its recommended mpp and the mpp at which it sees the data: the whole image is resized
    to the encoder's load size (``resize_size``, before any centre crop), so along each side
    native mpp x image px / load size. A warning flags a factor over 2 between the two."""
    from pipeline.encoders.zoo import spec as zoo_spec

    if isinstance(data, dict) or data is None:
        return None
    meta_path = Path(data) / "dataset.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    mpp, (w, h) = meta.get("mpp"), meta.get("image_px") or (None, None)
    result = {
        "dataset": meta.get("name"),
        "mpp": mpp,
        "mpp_approximate": meta.get("mpp_approximate"),
        "image_px": [w, h],
        "encoders": {},
    }
    for name, text in encoders.items():
        model = zoo_spec(str(text).partition(":")[0])
        if model is None or Path(str(text)).is_dir():
            continue
        size = model.resize_size or model.input_size
        seen = None if mpp is None or w is None else [mpp * w / size, mpp * h / size]
        entry = {
            "model": model.key,
            "recommended_mpp": model.mpp,
            "tile_px": model.tile_px,
            "input_size": model.input_size,
            "effective_mpp": None if seen is None else round(max(seen), 4),
            "effective_mpp_xy": None if seen is None else [round(s, 4) for s in seen],
        }
        result["encoders"][name] = entry
        eff, rec = entry["effective_mpp"], model.mpp
        if warn and eff and rec and max(eff / rec, rec / eff) > 2:
            log.warning(
                "%s: encoder %s (%s) sees the %s images at %.3g um/px (native %s um/px, "
                "%dx%d px resized to %d px), more than 2x from its recommended %s um/px",
                data,
                name,
                model.key,
                meta.get("name"),
                eff,
                mpp,
                w,
                h,
                size,
                rec,
            )
    return result


PREPARERS: dict[str, Callable] = {
    name: globals()[spec.prepare] for name, spec in SPECS.items()
}  # name -> preparer, for tests and tools
