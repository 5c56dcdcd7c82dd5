"""Pretrained-aggregator transfer and few-shot training sets.

Shao et al. ("Do Multiple Instance Learning Models Transfer?", ICML 2025; code
mahmoodlab/MIL-Lab) show that an aggregator trained on a broad slide task (their PC-108,
108 classes) is a better start for a new task than a random one, even across organs. A
transferred model keeps the body of the pretrained one (instance embedding, attention,
transformer layers) and gets a new head for the new task's classes: the modules each
aggregator names as its ``head`` (:func:`pipeline.mil.base.head_keys`). As in their
release, the head is never carried over.

- :func:`source_checkpoint`: the checkpoint a ``--init_from`` path names.
- :func:`read_source`: its model's settings and weights, checked against the run's model,
  feature size and encoder (features of another encoder are refused: the body's inputs would
  mean something else).
- :func:`transfer_body`: the body loaded into a fresh model; the missing keys must be
  exactly the new head's and nothing may be left over.
- :func:`training_subset`: ``shots`` slides per class, or a share of each class, of a fold's
  training slides, for few-shot curves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import ConfigError, PipelineError
from pipeline.io import sha256_file
from pipeline.mil.bags import same_encoder
from pipeline.mil.base import head_keys, head_prefixes

log = logging.getLogger(__name__)


def source_checkpoint(path: str | Path) -> Path:
    """The model.ckpt that ``path`` names: the file itself, or a run folder's only fold
    model (a run of several folds must name one: RUN/fold_<k>/model.ckpt)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ConfigError(f"--init_from {path}: no such checkpoint or run folder")
    models = sorted(path.glob("fold_*/model.ckpt"))
    if len(models) == 1:
        return models[0]
    if not models:
        raise ConfigError(
            f"--init_from {path}: no fold model (fold_<k>/model.ckpt); name a finished "
            "train-mil run or its model.ckpt"
        )
    raise ConfigError(
        f"--init_from {path}: the run has {len(models)} fold models; name one, e.g. "
        f"--init_from {models[0]}"
    )


@dataclass(frozen=True)
class Source:
    """A pretrained aggregator: its checkpoint, settings and model weights."""

    path: Path
    sha256: str
    hparams: dict
    state: dict[str, torch.Tensor]  # the model's (prefix ``model.`` removed)
    feature_mean: torch.Tensor
    feature_std: torch.Tensor

    @property
    def standardize(self) -> bool:
        return bool(self.hparams.get("standardize"))


def read_source(
    path: str | Path, model: str, model_args: dict, in_dim: int, encoder: dict | None
) -> Source:
    """The pretrained aggregator at ``path`` (:func:`source_checkpoint`), refused unless it is
    a ``model`` with ``model_args`` on ``in_dim`` features of ``encoder`` (the identity the
    run's feature files record, :func:`pipeline.mil.bags.encoder_identity`)."""
    ckpt_path = source_checkpoint(path)
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        hparams = dict(ckpt["hyper_parameters"])
        state = ckpt["state_dict"]
    except Exception as exc:  # a truncated or foreign file: say which and what to do
        raise PipelineError(
            f"--init_from {ckpt_path}: not a train-mil checkpoint ({exc}); name a model.ckpt "
            "of a finished train-mil run"
        ) from exc
    if hparams.get("model") != model:
        raise ConfigError(
            f"--init_from {ckpt_path}: a {hparams.get('model')} model cannot initialise "
            f"{model}; train with --model {hparams.get('model')}"
        )
    if dict(hparams.get("model_args") or {}) != dict(model_args):
        raise ConfigError(
            f"--init_from {ckpt_path}: trained with model_args {hparams.get('model_args')}, "
            f"this run has {dict(model_args)}; use the pretrained model's"
        )
    if hparams.get("in_dim") != in_dim:
        raise ConfigError(
            f"--init_from {ckpt_path}: trained on {hparams.get('in_dim')}-d features, these "
            f"are {in_dim}-d: extract them with the encoder it was trained on"
        )
    trained_on = hparams.get("encoder")
    if trained_on is None:
        raise ConfigError(
            f"--init_from {ckpt_path}: the checkpoint records no feature encoder (its features "
            "had no encoder attributes, or it predates them), so it cannot be checked against "
            "these features; retrain it on features from `cpath extract`"
        )
    if not same_encoder(trained_on, encoder):
        raise ConfigError(
            f"--init_from {ckpt_path}: trained on features of {trained_on}, these are of "
            f"{encoder}; a pretrained aggregator only transfers on features of the encoder "
            "it was trained on (extract them with it)"
        )
    model_state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    return Source(
        ckpt_path,
        sha256_file(ckpt_path),
        hparams,
        model_state,
        state.get("feature_mean", torch.zeros(in_dim)),
        state.get("feature_std", torch.ones(in_dim)),
    )


def transfer_body(module, source: Source) -> dict:
    """Load ``source``'s body into ``module`` (a :class:`~pipeline.mil.training.MILModule`
    built for the new task), with its feature standardization; returns what was loaded, the
    new head's keys and the pretrained head's keys that were dropped. An error unless the
    keys left missing are exactly the new head's and none is left over."""
    prefixes = head_prefixes(module.model)
    body = {k: v for k, v in source.state.items() if not k.startswith(prefixes)}
    dropped = sorted(k for k in source.state if k.startswith(prefixes))
    try:
        result = module.model.load_state_dict(body, strict=False)
    except RuntimeError as exc:  # shapes: checked model_args make this rare
        raise ConfigError(f"--init_from {source.path}: its body does not fit: {exc}") from exc
    head = sorted(head_keys(module.model))
    if sorted(result.missing_keys) != head or result.unexpected_keys:
        raise ConfigError(
            f"--init_from {source.path}: its body does not match this model's (missing "
            f"{sorted(set(result.missing_keys) - set(head))}, unexpected "
            f"{sorted(result.unexpected_keys)})"
        )
    module.feature_mean.copy_(source.feature_mean)
    module.feature_std.copy_(source.feature_std)
    report = {
        "source": str(source.path),
        "source_sha256": source.sha256,
        "loaded": sorted(body),
        "new_head": head,
        "dropped_head": dropped,
        "standardize": source.standardize,
    }
    log.info(
        "init_from %s: %d body tensors loaded, new head %s (pretrained head dropped: %s)",
        source.path,
        len(body),
        ", ".join(head),
        ", ".join(dropped),
    )
    return report


def training_subset(
    slide_ids: list[str],
    strata: list[str],
    shots: int | None,
    fraction: float,
    seed: int,
) -> list[str]:
    """Of a fold's training slides (``strata``: each one's class, or event status), ``shots``
    per stratum, or ``fraction`` of each (at least one), drawn with ``seed``; in the order of
    ``slide_ids``. An error when a stratum has fewer than ``shots`` slides."""
    if shots is None and fraction >= 1.0:
        return list(slide_ids)
    rng = np.random.default_rng(seed)
    keep: set[str] = set()
    for stratum in sorted(set(strata)):
        members = [s for s, g in zip(slide_ids, strata, strict=True) if g == stratum]
        if shots is not None:
            if len(members) < shots:
                raise PipelineError(
                    f"--shots {shots}: class {stratum} has {len(members)} training slides in "
                    "this fold; use fewer shots or more folds' worth of slides"
                )
            n = shots
        else:
            n = max(1, round(fraction * len(members)))
        keep.update(rng.choice(members, size=n, replace=False).tolist())
    return [s for s in slide_ids if s in keep]


def check_transfer_settings(
    shots: int | None, fraction: float, task: str, strategy: str, init_from
) -> None:
    """A clear error for settings of transfer or few-shot training that cannot run."""
    if shots is not None and shots < 1:
        raise ConfigError(f"--shots must be at least 1, got {shots}")
    if shots is not None and task != "classification":
        raise ConfigError("--shots is per class: use --train_fraction for survival")
    if shots is not None and fraction < 1.0:
        raise ConfigError("give --shots or --train_fraction, not both")
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"--train_fraction must be in (0, 1], got {fraction}")
    if init_from is not None and strategy == "mhim":
        raise ConfigError(
            "--init_from with strategy mhim: the teacher starts from --teacher_init; start "
            "the plain run that --teacher_init names from --init_from instead"
        )
