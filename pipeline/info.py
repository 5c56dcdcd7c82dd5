"""``cpath info``: versions, compute devices, OpenSlide, and whether the demo data is present."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import pipeline


@dataclass
class InfoConfig:
    """Print package versions, available devices, the OpenSlide library and the demo data.

    Args:
        demo: demo cohort folder to look for.
        json: print one JSON object instead of text.
    """

    demo: Path = Path("data/demo")
    json: bool = False


PACKAGES = (
    "torch",
    "torchvision",
    "timm",
    "lightning",
    "openslide-python",
    "openslide-bin",
    "h5py",
    "numpy",
    "scikit-learn",
    "scikit-image",
    "tifffile",
    "imagecodecs",
    "safetensors",
    "jsonargparse",
)


def collect_info(demo: str | os.PathLike = "data/demo") -> dict:
    """Versions, devices, OpenSlide library version and demo-data status as a dict."""
    versions = {"cpath-pipeline": pipeline.__version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None

    import torch

    devices = {"cpu_cores": os.cpu_count(), "cuda": torch.cuda.is_available()}
    devices["cuda_devices"] = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if devices["cuda"]
        else []
    )
    devices["mps"] = bool(
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    )

    try:
        import openslide

        openslide_info = {"library": openslide.__library_version__, "python": openslide.__version__}
    except (ImportError, OSError) as exc:
        openslide_info = {"library": None, "error": str(exc)}

    demo = Path(demo)
    demo_info = {"path": str(demo.resolve()), "present": False}
    try:
        cohort = json.loads((demo / "cohort.json").read_text())
        slides = cohort["slides"]
        missing = [s["slide_id"] for s in slides if not (demo / s["path"]).exists()]
        demo_info.update(present=not missing, n_slides=len(slides), missing=missing)
    except (OSError, json.JSONDecodeError, KeyError):
        pass
    return {
        "versions": versions,
        "devices": devices,
        "openslide": openslide_info,
        "demo_data": demo_info,
        "platform": platform.platform(),
        "executable": sys.executable,
    }


def format_info(info: dict) -> str:
    """Human-readable text of :func:`collect_info`'s result."""
    lines = ["versions:"]
    lines += [f"  {k:<18}{v or 'not installed'}" for k, v in info["versions"].items()]
    d = info["devices"]
    cuda = ", ".join(d["cuda_devices"]) if d["cuda"] else "none"
    lines += [
        "devices:",
        f"  cpu cores         {d['cpu_cores']}",
        f"  cuda              {len(d['cuda_devices'])} ({cuda})",
        f"  mps               {d['mps']}",
    ]
    o = info["openslide"]
    lines += ["openslide:", f"  library           {o.get('library') or o.get('error')}"]
    demo = info["demo_data"]
    if demo["present"]:
        state = f"present ({demo['n_slides']} slides)"
    elif demo.get("missing"):
        state = f"incomplete ({len(demo['missing'])} slides missing): run `cpath demo --make-data`"
    else:
        state = "absent: run `make demo` or `cpath demo --make-data`"
    lines += ["demo data:", f"  {demo['path']}: {state}"]
    lines += ["platform:", f"  {info['platform']}", f"  {info['executable']}"]
    return "\n".join(lines)


def run(cfg: InfoConfig) -> None:
    info = collect_info(cfg.demo)
    print(json.dumps(info, indent=1) if cfg.json else format_info(info))
