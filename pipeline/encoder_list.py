"""``cpath encoders``: the encoder zoo (:mod:`pipeline.encoders.zoo`) as a table.

cpath encoders            key, aliases, dim of the default mode, input, mpp, licence, gated
cpath encoders --json     the same rows as one JSON list
"""

from __future__ import annotations

import json
from dataclasses import dataclass

COLUMNS = ("key", "aliases", "dim", "input", "mpp", "licence", "gated")


@dataclass
class EncodersConfig:
    """List the public pathology foundation models that --encoder KEY[:MODE] loads (with
    --encoder_weights FILE: weights are never downloaded).

    Args:
        json: print one JSON list instead of a table.
    """

    json: bool = False


def zoo_rows() -> list[dict]:
    """One row per zoo model: key, aliases, default-mode dim, input px, mpp, licence, gated."""
    from pipeline.encoders.zoo import specs

    return [
        {
            "key": s.key,
            "aliases": ", ".join(s.aliases),
            "dim": f"{s.modes[s.default_mode]} ({s.default_mode})",
            "input": s.input_size,
            "mpp": "?" if s.mpp is None else s.mpp,
            "licence": s.licence,
            "gated": {True: "yes", False: "no", None: "?"}[s.gated],
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
    rows = zoo_rows()
    print(json.dumps(rows, indent=2) if cfg.json else format_table(rows))
    if not cfg.json:
        print(
            "\n--encoder KEY or KEY:MODE (modes: `cpath encoders --json`), weights from the hub id"
        )
    return 0
