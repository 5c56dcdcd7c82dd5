"""Named stain normalizers with published constants, usable wherever a normalizer JSON is.

``--data.stain_norm exapath`` (pretraining) and ``--stain_norm exapath`` (extraction) name
one of these instead of a file written by ``cpath stain --action fit``.

- ``exapath``: the Macenko normalizer of EXAPath (Yun et al., "EXAONEPath 1.0 Patch-level
  Foundation Model for Pathology", 2024), which pretrains on Macenko-normalised tiles to
  reduce WSI-specific feature collapse: target stain matrix ``[[0.5626, 0.2159],
  [0.7201, 0.8012], [0.4062, 0.5581]]`` (H, E columns), 99th-percentile concentrations
  ``[1.9705, 1.0308]``, ``Io = 240``, ``alpha = 1``, ``beta = 0.15`` (the constants of
  HEnorm_python and torchstain). Every pixel is used (stride 1) and no plausibility check
  rejects a tile (``min_similarity = 0``, ``min_tissue = 0``): as in the reference, a
  tile keeps its original colours only where the stains cannot be computed (fewer than 16
  tissue pixels, non-finite values), the reference's failure cases.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

STAIN_PRESETS: dict[str, dict] = {
    "exapath": {
        "method": "macenko",
        "params": {
            "stains": [[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]],
            "max_conc": [1.9705, 1.0308],
            "io": 240.0,
            "alpha": 1.0,
            "beta": 0.15,
            "min_tissue": 0.0,
            "stride": 1,
            "min_similarity": 0.0,
        },
    },
}


def preset_name(value: str | os.PathLike | None) -> str | None:
    """The preset ``value`` names (a bare preset name that is not an existing file), else None."""
    if value is None:
        return None
    text = os.fspath(value)
    return text if text in STAIN_PRESETS and not Path(text).exists() else None


def normalizer_body(value: str | os.PathLike) -> dict:
    """``{"method", "params"}`` of a preset name or of a normalizer JSON file."""
    from pipeline.errors import PipelineError

    name = preset_name(value)
    if name is not None:
        return json.loads(json.dumps(STAIN_PRESETS[name]))  # a copy
    path = Path(value)
    try:
        body = json.loads(path.read_text())
        if not isinstance(body, dict) or "method" not in body or "params" not in body:
            raise KeyError("method/params")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        known = ", ".join(sorted(STAIN_PRESETS))
        raise PipelineError(
            f"{path}: not a stain normalizer file nor a preset ({known}) "
            f"({type(exc).__name__}: {exc}); create one with `cpath stain --action fit "
            "--method macenko --target IMAGE --out stain.json`."
        ) from exc
    return body


def body_sha256(body: dict) -> str:
    """SHA-256 of a normalizer's ``{"method", "params"}`` in canonical JSON (key order and
    spacing do not matter): two equal normalizers have one digest, whatever file holds them."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
