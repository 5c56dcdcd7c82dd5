"""``cpath encoders``: the encoder zoo (:mod:`pipeline.encoders.zoo`) as a table.

cpath encoders            key, aliases, dim of the default mode, input, mpp, licence, gated,
                          loader, and where its weights are found locally (if anywhere)
cpath encoders --json     the same rows as one JSON list
"""

from __future__ import annotations

import json
from dataclasses import dataclass

COLUMNS = ("key", "aliases", "dim", "input", "mpp", "licence", "gated", "loader", "weights")
LOADERS = {
    "timm": "timm",
    "transformers": "transformers",
    "transformers+code": "transformers (the authors' code)",
    "external": "external (needs the authors' code)",
}


@dataclass
class EncodersConfig:
    """List the public pathology foundation models that --encoder KEY[:MODE] loads (with
    --encoder_weights FILE: weights are never downloaded).

    Args:
        json: print one JSON list instead of a table.
        weights_map: YAML weights map (``key: path``) to look in, besides $CPATH_WEIGHTS
            and the Hugging Face cache (no network is used).
    """

    json: bool = False
    weights_map: str | None = None


def zoo_rows(weights_map: str | None = None) -> list[dict]:
    """One row per zoo model: key, aliases, default-mode dim, input px, mpp, licence, gated,
    loader, and its local weights (``-`` where neither the map nor the cache has them)."""
    from pipeline.encoders.weights import local_weights
    from pipeline.encoders.zoo import specs

    def loader(s) -> str:
        return LOADERS[s.loader + ("+code" if s.remote_code else "")]

    def weights(s) -> str:
        if s.loader == "external":
            return "-"
        found, _ = local_weights(s, weights_map)
        return "-" if found is None else str(found)

    return [
        {
            "key": s.key,
            "aliases": ", ".join(s.aliases),
            "dim": f"{s.modes[s.default_mode]} ({s.default_mode})",
            "input": s.input_size,
            "mpp": "?" if s.mpp is None else s.mpp,
            "licence": s.licence,
            "gated": {True: "yes", False: "no", None: "?"}[s.gated],
            "loader": loader(s),
            "weights": weights(s),
            "modes": {mode: dim for mode, dim in s.modes.items()},
            "hub_id": s.hub_id,
        }
        for s in specs()
    ]


def format_table(rows: list[dict]) -> str:
    """``rows`` as aligned text columns (:data:`COLUMNS`)."""
    cells = [list(COLUMNS)] + [[str(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def run(cfg: EncodersConfig) -> int:
    rows = zoo_rows(cfg.weights_map)
    print(json.dumps(rows, indent=2) if cfg.json else format_table(rows))
    if not cfg.json:
        print(
            "\n--encoder KEY or KEY:MODE (modes: `cpath encoders --json`), weights from the hub id"
        )
    return 0
