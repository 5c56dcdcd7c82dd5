"""The work behind ``cpath train-mil`` (see :mod:`pipeline.mil.train`): one Lightning module
per fold, patient-grouped cross-validation, out-of-fold predictions and metrics."""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import shutil
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, WeightedRandomSampler
from tqdm.auto import tqdm

from pipeline.config import config_to_dict, save_config
from pipeline.errors import ConfigError, PipelineError
from pipeline.io import atomic_path, atomic_write_text, sha256_file
from pipeline.mil.bags import BaseBagStore, collate, open_bag_store
from pipeline.mil.base import head_keys, make_mil
from pipeline.mil.metrics import (
    baseline_survival_function,
    bootstrap_cis,
    classification_metrics,
    neg_partial_log_likelihood,
    survival_horizons,
    survival_metrics,
)
from pipeline.mil.mhim import (
    MHIM_MODELS,
    cosine_schedule,
    ema_update,
    instance_scores,
    keep_mask,
    soft_cross_entropy,
)
from pipeline.mil.splits import (
    fold_members,
    make_splits,
    read_splits,
    splits_mismatch,
    write_splits,
)
from pipeline.mil.supcon import (
    SUPCON_MODELS,
    ClassAwareBatches,
    ProjectionHead,
    curriculum_weight,
    supcon_loss,
)
from pipeline.mil.train import TrainMILConfig
from pipeline.mil.transfer import (
    check_transfer_settings,
    read_source,
    source_checkpoint,
    training_subset,
    transfer_body,
)

log = logging.getLogger(__name__)


def nll_survival_loss(
    logits: torch.Tensor, bins: torch.Tensor, event: torch.Tensor
) -> torch.Tensor:
    """Discrete-time survival negative log-likelihood (Zadeh and Schmid, 2020): hazards
    ``sigmoid(logits)`` (``B x K``), survival ``S_k = prod_{j<=k} (1 - h_j)``."""
    hazards = torch.sigmoid(logits.float()).clamp(1e-7, 1 - 1e-7)
    surv = torch.cat([torch.ones_like(hazards[:, :1]), torch.cumprod(1 - hazards, dim=1)], dim=1)
    b = bins.long().unsqueeze(1)
    observed = -(torch.log(surv.gather(1, b)) + torch.log(hazards.gather(1, b))).squeeze(1)
    censored = -torch.log(surv.gather(1, b + 1)).squeeze(1)
    return torch.where(event > 0, observed, censored).mean()


def cox_loss(
    risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor, ties: str = "efron"
) -> torch.Tensor:
    """Negative Cox partial log-likelihood (Cox, 1972) per event, by torchsurv's
    ``neg_partial_log_likelihood``. ``risk`` (``B``) is the log relative hazard (higher =
    earlier event); tied event times by Efron's (1977) or Breslow's (1974) method (``ties``),
    so the loss does not depend on the order of the bags. The sum over event times is divided
    by the number of events (torchsurv's ``mean`` divides by the number of distinct event
    times). Zero, on the graph, without an event or with fewer than two bags."""
    risk = risk.float().reshape(-1)  # B
    observed = event.reshape(-1) > 0  # B
    if risk.numel() < 2 or not bool(observed.any()):
        return risk.sum() * 0.0
    with warnings.catch_warnings():  # torchsurv warns on every batch with tied times
        warnings.filterwarnings("ignore", message="Ties in `time` detected")
        total = neg_partial_log_likelihood(
            risk, observed, time.reshape(-1).float(), ties_method=ties, reduction="sum"
        )
    return total / observed.sum()


def survival_risk(logits: torch.Tensor, loss: str) -> torch.Tensor:
    """Higher = earlier expected death: ``-sum(S)`` (discrete time) or the Cox log-risk."""
    if loss == "cox":
        return logits[:, 0].float()
    surv = torch.cumprod(1 - torch.sigmoid(logits.float()), dim=1)
    return -surv.sum(1)


MHIM_SETTINGS = {  # MILModule's ``mhim`` keys: the TrainMILConfig fields they come from
    "mask_ratio": "mhim_mask_ratio",
    "mask_ratio_l": "mhim_mask_ratio_l",
    "mask_ratio_h": "mhim_mask_ratio_h",
    "mask_ratio_hr": "mhim_mask_ratio_hr",
    "h_decay": "mhim_h_decay",
    "alpha": "mhim_alpha",
    "temp_t": "mhim_temp_t",
    "temp_s": "mhim_temp_s",
    "momentum": "mhim_momentum",
    "momentum_cosine": "mhim_momentum_cosine",
    "momentum_final": "mhim_momentum_final",
}

SUPCON_SETTINGS = {  # MILModule's ``supcon`` keys: the TrainMILConfig fields they come from
    "temperature": "supcon_temperature",
    "curriculum_epochs": "supcon_curriculum_epochs",
    "batch_size": "supcon_batch_size",
}


def supcon_settings(cfg: TrainMILConfig) -> dict:
    """MILModule's ``supcon`` settings of ``cfg``, the curriculum defaulting to half the
    epochs."""
    settings = {k: getattr(cfg, f) for k, f in SUPCON_SETTINGS.items()}
    if settings["curriculum_epochs"] is None:
        settings["curriculum_epochs"] = cfg.epochs // 2
    return settings


def check_supcon(cfg: TrainMILConfig, n_classes: int | None = None) -> None:
    """A clear error when SC-MIL cannot run with ``cfg`` (``n_classes``: of the labels)."""
    if cfg.task != "classification":
        raise ConfigError(
            f"strategy supcon is for classification (its contrastive loss pulls together "
            f"bags of a class), not task {cfg.task}"
        )
    if cfg.model not in SUPCON_MODELS:
        raise ConfigError(
            f"strategy supcon needs a model with one bag embedding ({', '.join(SUPCON_MODELS)}), "
            f"not '{cfg.model}'"
        )
    if cfg.supcon_temperature <= 0:
        raise ConfigError(f"supcon_temperature must be > 0, got {cfg.supcon_temperature}")
    if cfg.supcon_curriculum_epochs is not None and cfg.supcon_curriculum_epochs < 0:
        raise ConfigError(
            f"supcon_curriculum_epochs must be >= 0, got {cfg.supcon_curriculum_epochs}"
        )
    if n_classes is not None and cfg.supcon_batch_size < 2 * n_classes:
        raise ConfigError(
            f"supcon_batch_size {cfg.supcon_batch_size} cannot hold two bags of each of "
            f"{n_classes} classes: use at least {2 * n_classes}"
        )


def _require_settings(strategy: str, expected: dict, given: dict | None) -> None:
    """A clear error when the settings of ``strategy`` lack any of ``expected``'s keys."""
    missing = sorted(set(expected) - set(given or {}))
    if missing:
        raise ConfigError(f"strategy {strategy}: settings missing: {', '.join(missing)}")


class MILModule(L.LightningModule):
    """A registered aggregator trained with AdamW + cosine, bag loss plus auxiliary loss.

    With ``strategy`` mhim (masked hard instance mining, Tang et al., ICCV 2023; see
    :mod:`pipeline.mil.mhim`) the module also holds ``teacher``, a copy of the model that
    gets no gradients: each training step masks instances of the bags by the teacher's
    attention, trains the model on the rest with the task's loss plus ``alpha`` times the
    soft cross-entropy of the bag embeddings, and then moves the teacher towards the model
    (EMA). Evaluation and prediction use the model on whole bags.

    With ``strategy`` supcon (SC-MIL, Juyal et al., WACV 2024; see :mod:`pipeline.mil.supcon`)
    the module also holds ``projection``, a head from the model's bag embedding to the space
    of the supervised contrastive loss (Khosla et al., 2020); the training loss at epoch
    ``e`` is ``w(e) * supcon + (1 - w(e)) * cross-entropy`` (``w`` by
    :func:`curriculum_weight` over ``curriculum_epochs``). Validation and prediction use the
    model alone, with the cross-entropy.
    """

    def __init__(
        self,
        model: str,
        in_dim: int,
        n_out: int,
        model_args: dict,
        task: str,
        lr: float,
        weight_decay: float,
        epochs: int,
        bag_weight: float,
        survival_loss: str,
        class_weights: list[float] | None = None,
        standardize: bool = False,
        cox_ties: str = "efron",
        strategy: str = "plain",
        mhim: dict | None = None,
        supcon: dict | None = None,
        encoder: dict | None = None,
        body_lr_scale: float = 1.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = make_mil(model, in_dim, n_out, **model_args)
        self.teacher: torch.nn.Module | None = None
        self.projection: torch.nn.Module | None = None
        if strategy == "supcon":
            if task != "classification" or model not in SUPCON_MODELS:
                raise ConfigError(
                    f"strategy supcon needs classification and a model with one bag embedding "
                    f"({', '.join(SUPCON_MODELS)}), not {task} with '{model}'"
                )
            _require_settings("supcon", SUPCON_SETTINGS, supcon)
            self.projection = ProjectionHead(self.model.classifier.in_features)
        elif strategy == "mhim":
            if model not in MHIM_MODELS:
                raise ConfigError(
                    f"strategy mhim needs an attention model with a bag embedding "
                    f"({', '.join(MHIM_MODELS)}), not '{model}'"
                )
            _require_settings("mhim", MHIM_SETTINGS, mhim)
            self.teacher = copy.deepcopy(self.model).requires_grad_(False)
        elif strategy != "plain":
            raise ConfigError(f"unknown strategy '{strategy}'; known: plain, supcon, mhim")
        self.weights = torch.tensor(class_weights) if class_weights else None
        # the Cox loss compares bags: validation collects the per-bag risks, times and events
        # of the epoch (one bag per step) and scores them together at its end
        self.val_risks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        # per-feature mean and std of the training instances (saved with the model)
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))

    @classmethod
    def for_config(
        cls,
        cfg: TrainMILConfig,
        in_dim: int,
        n_out: int,
        encoder: dict | None = None,
        standardize: bool | None = None,
        class_weights: list[float] | None = None,
    ) -> MILModule:
        """The module ``cfg`` trains: its model, task, optimiser, loss and standardization
        (``standardize``: in place of ``cfg.standardize``); ``encoder``: what made the
        features (recorded with the model, checked when it is transferred)."""
        return cls(
            cfg.model,
            in_dim,
            n_out,
            dict(cfg.model_args),
            cfg.task,
            cfg.lr,
            cfg.weight_decay,
            cfg.epochs,
            cfg.bag_weight,
            cfg.survival_loss,
            class_weights=class_weights,
            standardize=cfg.standardize if standardize is None else standardize,
            cox_ties=cfg.cox_ties,
            strategy=cfg.strategy,
            mhim={k: getattr(cfg, f) for k, f in MHIM_SETTINGS.items()}
            if cfg.strategy == "mhim"
            else None,
            supcon=supcon_settings(cfg) if cfg.strategy == "supcon" else None,
            encoder=encoder,
            body_lr_scale=cfg.init_body_lr_scale if cfg.init_from else 1.0,
        )

    def standardized(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.get("standardize"):
            x = (x - self.feature_mean) / self.feature_std  # B x N x D
        return x

    def forward(self, x: torch.Tensor, mask: torch.Tensor, labels=None) -> dict:
        return self.model(self.standardized(x), mask, labels=labels)

    def target_loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """The task's loss of ``B x C`` logits: cross-entropy, Cox or discrete-time NLL."""
        hp = self.hparams
        if hp.task == "classification":
            w = self.weights.to(self.device) if self.weights is not None else None
            return F.cross_entropy(logits.float(), batch["y"], weight=w)
        if hp.survival_loss == "cox":
            return cox_loss(logits[:, 0], batch["time"], batch["event"], self.cox_ties)
        if "bin" not in batch:
            raise ValueError("the nll loss needs time bins: use Targets.for_training")
        return nll_survival_loss(logits, batch["bin"], batch["event"])

    @property
    def cox_ties(self) -> str:
        return self.hparams.get("cox_ties", "efron")

    @property
    def whole_set_loss(self) -> bool:
        """The validation loss is the Cox loss of all validation bags together."""
        return self.hparams.task == "survival" and self.hparams.survival_loss == "cox"

    def loss(self, batch: dict) -> torch.Tensor:
        labels = batch["y"] if self.hparams.task == "classification" else None
        return self.model_loss(self(batch["x"], batch["mask"], labels=labels), batch)

    def model_loss(self, out: dict, batch: dict) -> torch.Tensor:
        """The task's loss of the model's outputs, with its auxiliary loss if any."""
        hp = self.hparams
        loss = self.target_loss(out["logits"], batch)
        aux = out.get("aux_loss")
        if aux is None and "max_logits" in out and self.training:
            # DSMIL's instance stream without class labels (survival): the task's loss of the
            # max-instance outputs, as the paper sums the two streams' losses
            aux = self.target_loss(out["max_logits"], batch)
        if aux is not None:
            loss = hp.bag_weight * loss + (1 - hp.bag_weight) * aux
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.teacher is not None:
            loss = self.mhim_loss(batch)
        elif self.projection is not None:
            loss = self.scmil_loss(batch)
        else:
            loss = self.loss(batch)
        self.log("train_loss", loss, on_epoch=True, on_step=False, batch_size=len(batch["y"]))
        return loss

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole training (the schedules' length)."""
        try:
            return int(self.trainer.estimated_stepping_batches)
        except RuntimeError:  # not attached to a trainer
            return 0

    def mhim_loss(self, batch: dict) -> torch.Tensor:
        """One MHIM step: the teacher's attention on the whole bags (training mode, no
        gradients), the model on the kept instances, the task's loss plus ``alpha`` times
        the soft cross-entropy from the teacher's bag embedding to the model's."""
        hp = self.hparams.mhim
        x, mask = self.standardized(batch["x"]), batch["mask"]  # B x N x D, B x N
        with torch.no_grad():
            teacher = self.teacher(x, mask)
        ratio_h = hp["mask_ratio_h"]
        if hp["h_decay"]:
            ratio_h = cosine_schedule(ratio_h, 0.0, self.global_step, self.total_steps)
        keep = keep_mask(  # B x N
            instance_scores(teacher),
            mask,
            hp["mask_ratio"],
            hp["mask_ratio_l"],
            ratio_h,
            hp["mask_ratio_hr"],
        )
        labels = batch["y"] if self.hparams.task == "classification" else None
        out = self.model(x, keep, labels=labels)
        consistency = soft_cross_entropy(
            out["embedding"], teacher["embedding"], hp["temp_s"], hp["temp_t"]
        )
        kept = keep.sum() / mask.sum()
        self.log("train_kept", kept, on_epoch=True, on_step=False, batch_size=len(batch["y"]))
        return self.model_loss(out, batch) + hp["alpha"] * consistency

    def supcon_weight(self) -> float:
        """The contrastive share of the loss in the current epoch."""
        return curriculum_weight(self.current_epoch, self.hparams.supcon["curriculum_epochs"])

    def scmil_loss(self, batch: dict) -> torch.Tensor:
        """One SC-MIL step: ``w * supcon(projection(bag embedding), labels) + (1 - w) *`` the
        task's loss (cross-entropy, with the model's auxiliary loss if any), ``w`` of
        :meth:`supcon_weight`; both terms are logged (train_supcon, train_ce)."""
        hp = self.hparams.supcon
        out = self(batch["x"], batch["mask"], labels=batch["y"])
        z = self.projection(out["embedding"].float())  # B x 128
        contrastive = supcon_loss(z, batch["y"], hp["temperature"], hp["temperature"])
        ce = self.model_loss(out, batch)
        w = self.supcon_weight()
        size = len(batch["y"])
        self.log("train_supcon", contrastive, on_epoch=True, on_step=False, batch_size=size)
        self.log("train_ce", ce, on_epoch=True, on_step=False, batch_size=size)
        self.log("train_supcon_weight", w, on_epoch=True, on_step=False, batch_size=size)
        return w * contrastive + (1 - w) * ce

    def teacher_momentum(self) -> float:
        """The EMA momentum after the current optimiser step (cosine to the final one when
        asked)."""
        hp = self.hparams.mhim
        if not hp["momentum_cosine"]:
            return hp["momentum"]
        step = max(self.global_step - 1, 0)  # the step just taken
        return cosine_schedule(hp["momentum"], hp["momentum_final"], step, self.total_steps)

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        if self.teacher is not None:  # after the optimiser step
            ema_update(self.teacher, self.model, self.teacher_momentum())

    def on_validation_epoch_start(self) -> None:
        self.val_risks.clear()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if self.whole_set_loss:  # the bag's risk, scored with the others at the epoch's end
            risk = self(batch["x"], batch["mask"])["logits"][:, 0].float()  # B
            self.val_risks.append((risk, batch["time"], batch["event"]))
            return
        self.log("val_loss", self.loss(batch), on_epoch=True, batch_size=len(batch["y"]))

    def on_validation_epoch_end(self) -> None:
        if self.whole_set_loss and self.val_risks:
            risk, time, event = (torch.cat(parts) for parts in zip(*self.val_risks, strict=True))
            self.log("val_loss", cox_loss(risk, time, event, self.cox_ties))
            self.val_risks.clear()

    def configure_optimizers(self):
        hp = self.hparams
        # the model's parameters and an SC-MIL projection head (an MHIM teacher follows the
        # model by EMA); a transferred body at its own learning rate
        head = list(self.projection.parameters()) if self.projection is not None else []
        body = []
        scale = hp.get("body_lr_scale", 1.0)
        if scale != 1.0:
            in_head = set(head_keys(self.model))
            for name, p in self.model.named_parameters():
                (head if name in in_head else body).append(p)
            groups = [{"params": body, "lr": hp.lr * scale}, {"params": head, "lr": hp.lr}]
        else:
            groups = [{"params": list(self.model.parameters()) + head, "lr": hp.lr}]
        opt = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        return {
            "optimizer": opt,
            "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, hp.epochs),
        }


def read_labels(path: Path, task: str) -> list[dict]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read the labels ({exc})") from exc
    need = {"slide_id", "label"} if task == "classification" else {"slide_id", "time", "event"}
    missing = need - set(rows[0] if rows else {})
    if missing:
        raise PipelineError(f"{path}: missing columns {sorted(missing)} for --task {task}")
    if rows and "case_id" not in rows[0]:
        log.warning(
            "%s has no case_id column: each slide counts as its own patient, so slides of "
            "one patient can be in the training and test sets of a fold; add case_id",
            path,
        )
    for r in rows:
        r.setdefault("case_id", r["slide_id"])
        r["case_id"] = r["case_id"] or r["slide_id"]
        if task == "survival":
            r["time"], r["event"] = float(r["time"]), int(float(r["event"]))
            r.setdefault("label", str(r["event"]))
    return rows


def bin_edges(rows: list[dict], time_bins: int) -> np.ndarray:
    """The ``time_bins - 1`` inner edges of the discrete-time bins (Zadeh and Schmid, 2020):
    quantiles of the event times of the patients of ``rows`` (of all their times when none
    has an event), one value per patient, its first slide's (a patient's slides share time
    and event), so patients with many slides do not weigh more."""
    first: dict[str, dict] = {}
    for r in rows:
        first.setdefault(r["case_id"], r)
    patients = list(first.values())
    events = [r["time"] for r in patients if r["event"]]
    times = np.array(events if events else [r["time"] for r in patients], dtype=float)
    return np.quantile(times, np.linspace(0, 1, time_bins + 1))[1:-1]


class Targets:
    """Per-slide tensors of the training targets. For survival, the discrete-time bins are
    fitted on a fold's training slides only (:meth:`for_training`); before that, batches have
    time and event but no ``bin``."""

    def __init__(
        self,
        rows: list[dict],
        task: str,
        classes: list[str],
        time_bins: int,
        train_ids: list[str] | None = None,
    ):
        self.task, self.classes, self.time_bins = task, classes, time_bins
        self.by_id = {r["slide_id"]: r for r in rows}
        self.edges: np.ndarray | None = None
        if task == "survival" and train_ids is not None:
            self.edges = bin_edges([self.by_id[s] for s in train_ids], time_bins)

    def for_training(self, train_ids: list[str]) -> Targets:
        """These targets with the bins of :func:`bin_edges` of the slides ``train_ids``."""
        return Targets(
            list(self.by_id.values()), self.task, self.classes, self.time_bins, train_ids
        )

    def stratum(self, slide_id: str) -> str:
        """What a slide's sampling is stratified by: its class, or its event status."""
        r = self.by_id[slide_id]
        return str(r["label"]) if self.task == "classification" else f"event={r['event']}"

    def batch(self, ids: list[str]) -> dict:
        rows = [self.by_id[s] for s in ids]
        if self.task == "classification":
            return {"y": torch.tensor([self.classes.index(r["label"]) for r in rows])}
        time = np.array([r["time"] for r in rows])
        out = {
            "y": torch.zeros(len(rows)),
            "time": torch.tensor(time, dtype=torch.float32),
            "event": torch.tensor([r["event"] for r in rows], dtype=torch.float32),
        }
        if self.edges is not None:
            out["bin"] = torch.from_numpy(np.searchsorted(self.edges, time, side="right"))
        return out


def bag_loader(ids, store, targets, cfg, train: bool, generator) -> DataLoader:
    """Batches of bags: subsampled and class-balanced for training (with strategy supcon,
    :class:`ClassAwareBatches` of ``supcon_batch_size`` bags), whole for evaluation."""

    def collate_fn(batch_ids):
        x, mask = collate(store, batch_ids, cfg.max_instances if train else None, generator)
        return {"x": x, "mask": mask, "ids": batch_ids, **targets.batch(batch_ids)}

    if train and cfg.strategy == "supcon":  # at least two bags of every class per batch
        labels = [targets.classes.index(targets.by_id[s]["label"]) for s in ids]
        batches = ClassAwareBatches(
            labels, cfg.supcon_batch_size, per_class=2, seed=generator.initial_seed()
        )
        return DataLoader(ids, batch_sampler=batches, collate_fn=collate_fn)
    sampler = None
    if train and cfg.balanced and cfg.task == "classification":
        labels = [targets.by_id[s]["label"] for s in ids]
        counts = {c: labels.count(c) for c in set(labels)}
        weights = torch.tensor([1.0 / counts[c] for c in labels])
        sampler = WeightedRandomSampler(weights, len(ids), replacement=True, generator=generator)
    # evaluation: one whole bag per step (the Cox validation loss is computed from the
    # collected per-bag risks at the end of the epoch, see MILModule)
    size = cfg.batch_size if train else 1
    return DataLoader(
        ids,
        batch_size=max(1, size),
        sampler=sampler,
        shuffle=train and sampler is None,
        collate_fn=collate_fn,
        generator=generator,
    )


def predict_logits(module: MILModule, ids, store, precision: str = "32-true") -> torch.Tensor:
    """``N x C`` float32 logits (on the CPU) of the whole bags ``ids``, one bag at a time on
    the module's device, under bf16 autocast when ``precision`` is bf16-mixed (as Lightning
    trains with it)."""
    module.eval()
    device = module.device
    outs = [torch.zeros(0, module.hparams.n_out)]  # no bags: 0 x C
    autocast = torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=precision.startswith("bf16")
    )
    with torch.inference_mode(), autocast:
        for slide_id in ids:
            x, mask = collate(store, [slide_id])  # 1 x N x D, 1 x N
            logits = module(x.to(device), mask.to(device))["logits"]  # 1 x C
            outs.append(logits.float().cpu())
    return torch.cat(outs)


def predict_bags(
    module: MILModule, ids, store, targets, cfg, precision: str = "32-true"
) -> list[np.ndarray]:
    """Per whole bag: class probabilities (C) or the survival risk (1); see
    :func:`predict_logits`."""
    logits = predict_logits(module, ids, store, precision)  # N x C
    if cfg.task == "classification":
        return list(torch.softmax(logits, -1).numpy())
    return list(survival_risk(logits, cfg.survival_loss)[:, None].numpy())


def discrete_survival(logits: torch.Tensor, edges: np.ndarray, horizons: list[float]) -> np.ndarray:
    """``N x H`` survival probabilities at ``horizons`` of the discrete-time model: the
    probability of surviving every bin that ends at or before the horizon (bin ``k`` holds
    times in ``[edges[k-1], edges[k])``), ``prod_{j<k} (1 - sigmoid(logits_j))`` for a
    horizon in bin ``k``: deaths in a bin count at its end, as in the likelihood of
    :func:`nll_survival_loss`. ``logits``: ``N x K``."""
    surv = torch.cumprod(1 - torch.sigmoid(logits.double()), dim=1)  # N x K: after bin k
    surv = torch.cat([torch.ones_like(surv[:, :1]), surv], dim=1)  # N x K+1: before bin k
    k = torch.from_numpy(np.searchsorted(edges, np.asarray(horizons, float), side="right"))
    return surv[:, k].numpy()  # N x H


def cox_survival(
    train_risk: np.ndarray,
    train_time: np.ndarray,
    train_event: np.ndarray,
    risk: np.ndarray,
    horizons: list[float],
) -> np.ndarray:
    """``N x H`` survival probabilities at ``horizons`` of a Cox model, ``S_0(t) ^ exp(risk)``,
    with the Breslow (1972) baseline survival ``S_0`` of the training slides' log hazards
    (torchsurv ``baseline_survival_function``), a step function of time that is 1 before the
    first training time; NaN without a training event."""
    time = torch.as_tensor(np.asarray(train_time, np.float64).reshape(-1))  # M
    event = torch.as_tensor(np.asarray(train_event).reshape(-1) > 0)  # M
    new = torch.as_tensor(np.asarray(risk, np.float64).reshape(-1))  # N
    at = torch.as_tensor(np.asarray(horizons, np.float64).reshape(-1))  # H
    if len(time) < 2 or not bool(event.any()):
        return np.full((len(new), len(at)), np.nan)
    log_hz = torch.as_tensor(np.asarray(train_risk, np.float64).reshape(-1))  # M
    baseline = baseline_survival_function(log_hz, event, time)  # at the sorted unique times
    step = torch.searchsorted(baseline["time"], at, right=True) - 1  # H: last time <= t
    s0 = torch.where(step >= 0, baseline["baseline_survival"][step.clamp_min(0)], 1.0)  # H
    return (s0[None, :] ** torch.exp(new)[:, None]).numpy()  # N x H


# the settings that change a fold's model or predictions; the others (bootstrap, ordinal,
# progress, device, out, missing, the spelling of paths) only change how results are reported
TRAINING_SETTINGS = (
    "model",
    "model_args",
    "task",
    "epochs",
    "patience",
    "lr",
    "weight_decay",
    "batch_size",
    "max_instances",
    "standardize",
    "balanced",
    "bag_weight",
    "survival_loss",
    "cox_ties",
    "time_bins",
    "seed",
    "precision",
)


# the training strategy's settings, in the fingerprint when it is not plain (teacher_init by
# the content of its fold models)
STRATEGY_SETTINGS = (
    "strategy",
    "mhim_student_init",
    *MHIM_SETTINGS.values(),
    *SUPCON_SETTINGS.values(),
)
# those of each strategy (mhim's as they were before supcon was added)
OWN_SETTINGS = {
    "mhim": ("strategy", "mhim_student_init", *MHIM_SETTINGS.values()),
    "supcon": ("strategy", *SUPCON_SETTINGS.values()),
}


# settings added to training later, in the fingerprint when set
OPTIONAL_SETTINGS = ("class_weighted",)
# transfer and few-shot settings, in the fingerprint when any is set (init_from by the content
# of its checkpoint)
TRANSFER_SETTINGS = ("init_body_lr_scale", "shots", "train_fraction")


def training_fingerprint(cfg: TrainMILConfig, store: BaseBagStore, splits: list[dict]) -> dict:
    """What finished folds depend on: the training settings, the labels file's content, the
    feature files read and the splits (a change of any retrains the folds)."""
    settings = config_to_dict(cfg)
    record = {
        **{k: settings[k] for k in TRAINING_SETTINGS},
        "labels_sha256": sha256_file(cfg.labels),
        "features_read": store.fingerprint,
        "splits_sha256": hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest(),
    }
    if cfg.strategy != "plain":  # (plain runs keep the fingerprint they had before)
        record["strategy"] = {k: settings[k] for k in OWN_SETTINGS[cfg.strategy]}
        if cfg.teacher_init:
            record["strategy"]["teachers_sha256"] = [
                sha256_file(teacher_checkpoint(cfg, k))
                for k in range(sum(1 for key in splits[0] if key.startswith("fold_")))
            ]
    for key in OPTIONAL_SETTINGS:  # (runs without them keep the fingerprint they had before)
        if settings[key]:
            record[key] = settings[key]
    if cfg.init_from or cfg.shots is not None or cfg.train_fraction < 1.0:
        record["transfer"] = {k: settings[k] for k in TRANSFER_SETTINGS}
        if cfg.init_from:
            record["transfer"]["init_from_sha256"] = sha256_file(source_checkpoint(cfg.init_from))
    return record


def split_settings(cfg: TrainMILConfig) -> dict:
    """The settings ``OUT/splits.csv`` was made with (or the ``--splits`` file used)."""
    if cfg.splits:
        return {"file": str(Path(cfg.splits).resolve())}
    return {"folds": cfg.folds, "val_share": cfg.val_share, "seed": cfg.seed, "task": cfg.task}


def run_splits(
    cfg: TrainMILConfig, out: Path, rows: list[dict], made_with: dict | None
) -> list[dict]:
    """The run's splits: the ``--splits`` file (an error when it does not fit the labelled
    slides), else ``OUT/splits.csv`` when it was made with the same settings (``made_with``,
    from the previous run) and still fits the slides, patients, labels and fold count, else
    new splits written there (with a warning saying why the old ones were not reused)."""
    if cfg.splits:
        splits = read_splits(cfg.splits)
        why = splits_mismatch(splits, rows, exact=False)
        if why:
            raise PipelineError(
                f"{cfg.splits}: these splits do not fit {cfg.labels}: {why}; make "
                "them again, or leave out --splits to make new ones"
            )
        count = sum(1 for k in splits[0] if k.startswith("fold_"))
        if count != cfg.folds:
            log.warning(
                "%s has %d folds; they are used, not --folds %d", cfg.splits, count, cfg.folds
            )
        return splits
    path = out / "splits.csv"
    if path.is_file():
        splits = read_splits(path)
        why = splits_mismatch(splits, rows, cfg.folds)
        if why is None and made_with is not None and made_with != split_settings(cfg):
            why = f"they were made with {made_with}"
        if why is None:
            return splits
        log.warning("%s: made again (%s)", path, why)
    stratify = "label" if cfg.task == "classification" else "event"
    splits = make_splits(rows, cfg.folds, cfg.val_share, cfg.seed, stratify=stratify)
    write_splits(path, splits)
    return read_splits(path)  # as a reuse reads them (strings), for the fingerprint


def train_cv(cfg: TrainMILConfig) -> dict:
    """Cross-validate ``cfg.model``; writes the run folder and returns the metrics."""
    if cfg.features is None or cfg.labels is None:
        raise ConfigError(
            "train-mil needs --features FEATS (from `cpath extract`) and --labels labels.csv"
        )
    if cfg.strategy == "mhim" and cfg.model not in MHIM_MODELS:
        raise ConfigError(
            f"strategy mhim needs an attention model with a bag embedding "
            f"({', '.join(MHIM_MODELS)}), not '{cfg.model}'"
        )
    if cfg.strategy == "supcon":
        check_supcon(cfg)
    check_transfer_settings(cfg.shots, cfg.train_fraction, cfg.task, cfg.strategy, cfg.init_from)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = read_labels(Path(cfg.labels), cfg.task)
    available = {p.stem for p in Path(cfg.features).glob("*.h5")}
    if not available:
        raise PipelineError(f"{cfg.features}: no feature files; run `cpath extract` first")
    dropped = [r["slide_id"] for r in rows if r["slide_id"] not in available]
    if dropped and cfg.missing == "error":
        raise PipelineError(
            f"{cfg.labels}: {len(dropped)} labelled slides have no feature file in "
            f"{cfg.features} ({', '.join(dropped[:5])}); extract them or pass "
            "--missing skip"
        )
    if dropped:
        log.warning(
            "%d labelled slides have no features and are left out: %s",
            len(dropped),
            ", ".join(dropped[:5]),
        )
    rows = [r for r in rows if r["slide_id"] in available]
    unlabelled = available - {r["slide_id"] for r in rows}
    if unlabelled:
        log.info("%d feature files have no label and are not used", len(unlabelled))
    classes = sorted({r["label"] for r in rows}) if cfg.task == "classification" else []
    if cfg.task == "classification" and len(classes) < 2:
        raise PipelineError(
            f"{cfg.labels}: only one class ({', '.join(classes) or 'none'}) among "
            "the slides with features; classification needs two or more"
        )
    if cfg.strategy == "supcon":
        check_supcon(cfg, len(classes))
    previous_file = out / ".config.json"
    try:
        previous = json.loads(previous_file.read_text()) if previous_file.is_file() else {}
    except ValueError:
        previous = {}
    made_with = previous.get("splits") if "training" in previous else None  # older runs: unknown
    splits = run_splits(cfg, out, rows, made_with)
    folds = sum(1 for k in splits[0] if k.startswith("fold_"))
    if cfg.strategy == "mhim" and cfg.teacher_init:
        check_teacher_run(cfg, splits, folds)
    budget = None if cfg.memory_budget_gb is None else int(cfg.memory_budget_gb * 1e9)
    store = open_bag_store(cfg.features, [r["slide_id"] for r in rows], cfg.store, budget)
    source = (
        read_source(cfg.init_from, cfg.model, cfg.model_args, store.dim, store.encoder)
        if cfg.init_from
        else None
    )  # refused before any fold is touched
    record = {"training": training_fingerprint(cfg, store, splits), "splits": split_settings(cfg)}
    if previous.get("training") != record["training"]:  # other inputs or settings: start over
        for fold_dir in out.glob("fold_*"):
            shutil.rmtree(fold_dir)
    atomic_write_text(previous_file, json.dumps(record, sort_keys=True, default=str))
    save_config(cfg, out)
    empty = [s for s, n in zip(store.slide_ids, store.lengths.tolist(), strict=True) if n == 0]
    if empty:
        raise PipelineError(
            f"{len(empty)} slides have no tiles ({', '.join(empty[:5])}): their bags are "
            "empty; remove them from the labels or check the tissue detection"
        )
    targets = Targets(rows, cfg.task, classes, cfg.time_bins)
    n_out = (
        len(classes)
        if cfg.task == "classification"
        else (1 if cfg.survival_loss == "cox" else cfg.time_bins)
    )
    known = set(targets.by_id)
    horizons = _horizons(rows) if cfg.task == "survival" else []
    predictions = []
    bar = tqdm(
        total=folds * cfg.epochs,
        desc=f"train-mil {out.parent.name}/{out.name}",
        unit="epoch",
        disable=not cfg.progress,
    )
    for k in range(folds):
        fold_dir = out / f"fold_{k}"
        done = fold_dir / "predictions.csv"
        roles = {
            role: [s for s in fold_members(splits, k, role) if s in known]
            for role in ("train", "val", "test")
        }
        roles["train"] = training_subset(
            roles["train"],
            [targets.stratum(s) for s in roles["train"]],
            cfg.shots,
            cfg.train_fraction,
            cfg.seed + k,
        )
        bar.set_postfix(fold=f"{k + 1}/{folds}")
        if not done.is_file():
            _train_fold(
                cfg, k, fold_dir, roles, store, targets, n_out, classes, bar, horizons, source
            )
        bar.update(cfg.epochs * (k + 1) - bar.n)  # early stopping skips the rest of a fold
        with open(done, newline="") as f:
            predictions += list(csv.DictReader(f))
    bar.close()
    located = localization(cfg, out, store, splits, targets) if cfg.tile_labels else None
    return _write_results(cfg, out, predictions, classes, targets, located)


def read_tile_labels(path: Path) -> dict[str, dict[int, int]]:
    """``{slide_id: {tile index: 0 or 1}}`` of a tile-labels CSV (slide_id, index,
    positive; see ``TrainMILConfig.tile_labels``)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the tile labels ({exc})") from exc
    if not rows or not {"slide_id", "index", "positive"} <= set(rows[0]):
        raise ConfigError(f"{path}: tile labels need the columns slide_id, index, positive")
    labels: dict[str, dict[int, int]] = {}
    for i, row in enumerate(rows, start=2):
        try:
            index, positive = int(row["index"]), int(row["positive"])
        except ValueError:
            raise ConfigError(f"{path}, line {i}: index and positive must be integers") from None
        if positive not in (0, 1):
            raise ConfigError(f"{path}, line {i}: positive must be 0 or 1, got {positive}")
        labels.setdefault(row["slide_id"], {})[index] = positive
    return labels


def localization(cfg: TrainMILConfig, out: Path, store, splits, targets) -> dict:
    """Attention localization: per test slide with positive and negative labelled tiles,
    the ROC AUC of its fold model's tile scores (:func:`pipeline.mil.drawing.tile_scores`:
    attention of the predicted class, or the instance score) against the tile labels, as
    in CAMELYON16-style localization of attention-based MIL (Lu et al., CLAM, 2021); the
    mean over slides with a bootstrap CI over patients."""
    from sklearn.metrics import roc_auc_score

    from pipeline.mil.drawing import tile_scores

    labels = read_tile_labels(Path(cfg.tile_labels))
    per_slide: dict[str, float] = {}
    folds = sum(1 for k in splits[0] if k.startswith("fold_"))
    for k in range(folds):
        test = [s for s in fold_members(splits, k, "test") if s in labels and s in store.index]
        if not test:
            continue
        module = MILModule.load_from_checkpoint(
            out / f"fold_{k}" / "model.ckpt", map_location="cpu"
        )
        for slide_id in test:
            index = np.array(sorted(labels[slide_id]))
            positive = np.array([labels[slide_id][i] for i in index])
            n = int(store.lengths[store.index[slide_id]])
            if index.min() < 0 or index.max() >= n:
                raise PipelineError(
                    f"{cfg.tile_labels}: slide {slide_id} has {n} tiles, but a label names "
                    f"tile {int(index.max() if index.max() >= n else index.min())}"
                )
            if positive.min() == positive.max():
                continue  # one kind of tile only: no AUC
            scores = tile_scores(module, store.bag(slide_id).numpy())  # n
            per_slide[slide_id] = float(roc_auc_score(positive, scores[index]))
    ids = sorted(per_slide)
    values = np.array([per_slide[s] for s in ids])
    result = {
        "auc": float(values.mean()) if len(ids) else float("nan"),
        "n_slides": len(ids),
        "per_slide": per_slide,
        "labels": str(cfg.tile_labels),
        "scores": "tile attention of the predicted class (or instance score), fold model",
    }
    if len(ids) > 1 and cfg.bootstrap > 0:
        patients = np.array([targets.by_id[s]["case_id"] for s in ids])
        cis = bootstrap_cis(
            lambda idx: {"auc": float(values[idx].mean())},
            len(ids),
            n=cfg.bootstrap,
            seed=cfg.seed,
            groups=patients,
        )
        result["ci"] = list(cis["auc"])
    log.info("localization AUC %.3f over %d slides", result["auc"], len(ids))
    return result


def _horizons(rows: list[dict]) -> list[float]:
    """The times the survival metrics are evaluated at (:func:`survival_horizons`): quartiles
    of the patients' event times (one per patient, its first slide's), the same in every fold
    (they are not used in training)."""
    first: dict[str, dict] = {}
    for r in rows:
        first.setdefault(r["case_id"], r)
    patients = list(first.values())
    return survival_horizons([r["time"] for r in patients], [r["event"] for r in patients])


class _EpochBar(L.Callback):
    """Advances the run's progress bar (folds x epochs) after each training epoch."""

    def __init__(self, bar):
        self.bar = bar

    def on_train_epoch_end(self, trainer, module):
        self.bar.update(1)


def mil_device(cfg: TrainMILConfig) -> torch.device:
    """The device train-mil trains and predicts on: ``cfg.device`` (cpu, cuda or cuda:N),
    or with auto the GPU when torch sees one, else the CPU."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(cfg.device)
    except RuntimeError as exc:
        raise ConfigError(f"device '{cfg.device}': use auto, cpu, cuda or cuda:N") from exc
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device '{cfg.device}': use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{cfg.device}', but torch sees no GPU; use auto or cpu")
    return device


def mil_trainer(cfg: TrainMILConfig, **kwargs) -> L.Trainer:
    """One-device Lightning trainer on :func:`mil_device`: a GPU with bf16 autocast (precision
    auto), or the CPU. Progress is shown per epoch over all folds by :func:`train_cv`, not per
    step."""
    device = mil_device(cfg)
    cuda = device.type == "cuda"
    precision = cfg.precision if cfg.precision != "auto" else ("bf16-mixed" if cuda else "32-true")
    devices = [device.index] if cuda and device.index is not None else 1
    return L.Trainer(
        max_epochs=cfg.epochs,
        accelerator="gpu" if cuda else "cpu",
        devices=devices,
        precision=precision,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        **kwargs,
    )


def teacher_checkpoint(cfg: TrainMILConfig, k: int) -> Path:
    """Fold ``k``'s model of the ``teacher_init`` run."""
    return Path(cfg.teacher_init) / f"fold_{k}" / "model.ckpt"


def check_teacher_run(cfg: TrainMILConfig, splits: list[dict], folds: int) -> None:
    """The ``teacher_init`` run has a model per fold, of ``cfg.model``, and (where it wrote
    its splits) was trained on the same splits: otherwise its teachers would have seen the
    test slides."""
    run = Path(cfg.teacher_init)
    missing = [str(teacher_checkpoint(cfg, k)) for k in range(folds)]
    missing = [m for m in missing if not Path(m).is_file()]
    if missing:
        raise PipelineError(
            f"--teacher_init {run}: no fold model {', '.join(missing[:3])}; it must be a "
            f"finished train-mil run of {cfg.model} with {folds} folds"
        )
    if (run / "splits.csv").is_file() and read_splits(run / "splits.csv") != splits:
        raise PipelineError(
            f"--teacher_init {run} was trained on other splits than this run's; pass "
            f"--splits {run / 'splits.csv'} so that no teacher has seen a test slide"
        )


def init_teacher(module: MILModule, path: Path, student_init: str = "none") -> None:
    """Load the model of a finished run's fold checkpoint (``path``) into ``module``'s MHIM
    teacher, and into the model itself: nothing, its instance embedding (``embed``) or all
    of it (``student_init``), as the reference initialises teacher and student."""
    if module.teacher is None:
        raise ConfigError("a teacher checkpoint needs strategy mhim")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    trained = ckpt.get("hyper_parameters", {}).get("model")
    if trained != module.hparams.model:
        raise ConfigError(
            f"{path}: a {trained} model cannot initialise the teacher of {module.hparams.model}"
        )
    state = {k[6:]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    try:
        module.teacher.load_state_dict(state)
        if student_init == "all":
            module.model.load_state_dict(state)
        elif student_init == "embed":
            embed = {k: v for k, v in state.items() if k.startswith("embed.")}
            if not embed:
                raise ConfigError(f"{path}: the model has no instance embedding (embed.*)")
            module.model.load_state_dict(embed, strict=False)
        elif student_init != "none":
            raise ConfigError(f"mhim_student_init '{student_init}': use none, embed or all")
    except RuntimeError as exc:
        raise ConfigError(
            f"{path}: its model does not fit this one (other model_args?): {exc}"
        ) from exc


def class_weights(cfg: TrainMILConfig, targets, train_ids: list[str], classes: list[str]):
    """With ``class_weighted``, the cross-entropy's weight of each class: ``n / (K n_c)`` of
    the training slides (scikit-learn's ``balanced``); else None."""
    if not cfg.class_weighted or cfg.task != "classification":
        return None
    from sklearn.utils.class_weight import compute_class_weight

    y = np.array([targets.by_id[s]["label"] for s in train_ids])
    present = np.array([c for c in classes if c in set(y)])
    weights = dict(
        zip(present, compute_class_weight("balanced", classes=present, y=y), strict=True)
    )
    return [float(weights.get(c, 0.0)) for c in classes]


def _train_fold(
    cfg,
    k,
    fold_dir,
    roles,
    store,
    targets,
    n_out,
    classes,
    bar,
    horizons: list[float] = (),
    source=None,
) -> None:
    if fold_dir.exists():
        shutil.rmtree(fold_dir)
    fold_dir.mkdir(parents=True)
    L.seed_everything(cfg.seed + k, verbose=False)
    generator = torch.Generator().manual_seed(cfg.seed + k)
    targets = targets.for_training(roles["train"])  # bins from the fold's training patients
    weights = class_weights(cfg, targets, roles["train"], classes)
    if source is not None:  # a pretrained body, with the standardization it was trained with
        module = MILModule.for_config(
            cfg, store.dim, n_out, store.encoder, source.standardize, weights
        )
        report = transfer_body(module, source)
    else:
        module = MILModule.for_config(cfg, store.dim, n_out, store.encoder, class_weights=weights)
        if cfg.standardize:
            module.feature_mean, module.feature_std = store.statistics(roles["train"])
    if cfg.strategy == "mhim" and cfg.teacher_init:
        init_teacher(module, teacher_checkpoint(cfg, k), cfg.mhim_student_init)
    # with a validation split: the best epoch by validation loss, and early stopping;
    # without: the last epoch
    monitor = "val_loss" if roles["val"] else None
    ckpt = ModelCheckpoint(
        dirpath=fold_dir,
        filename="model",
        monitor=monitor,
        save_top_k=1,
        enable_version_counter=False,
        # without validation only the last epoch is kept: written once, not every epoch
        every_n_epochs=1 if monitor else cfg.epochs,
    )
    callbacks = [ckpt, _EpochBar(bar)]
    callbacks += [EarlyStopping(monitor, patience=cfg.patience)] if monitor else []
    trainer = mil_trainer(cfg, logger=CSVLogger(fold_dir, name="", version=""), callbacks=callbacks)
    train = bag_loader(roles["train"], store, targets, cfg, True, generator)
    val = bag_loader(roles["val"], store, targets, cfg, False, generator) if roles["val"] else None
    with warnings.catch_warnings():
        if val is None:  # no validation split: the last epoch is the model, by design
            warnings.filterwarnings("ignore", message="You defined a `validation_step` but have no")
        trainer.fit(module, train, val)
    # (written after Lightning's logger and checkpoint, which expect an empty folder)
    if source is not None:
        atomic_write_text(fold_dir / "transfer.json", json.dumps(report, indent=1))
    if cfg.shots is not None or cfg.train_fraction < 1.0:  # the slides this fold trained on
        atomic_write_text(fold_dir / "train_slides.txt", "".join(f"{s}\n" for s in roles["train"]))
    # the best epoch, predicted on the device and with the precision it was trained with
    device = trainer.strategy.root_device
    best = MILModule.load_from_checkpoint(
        ckpt.best_model_path or ckpt.last_model_path, map_location=device
    ).to(device)
    logits = predict_logits(best, roles["test"], store, str(trainer.precision))  # N x C
    if cfg.task == "classification":
        outs = list(torch.softmax(logits, -1).numpy())
    else:
        outs = list(survival_risk(logits, cfg.survival_loss)[:, None].numpy())
        surv = _fold_survival(
            cfg, best, roles, store, targets, logits, horizons, str(trainer.precision)
        )
    with atomic_path(fold_dir / "predictions.csv") as tmp, open(tmp, "w", newline="") as f:
        fields = ["slide_id", "case_id", "fold", "label"]
        fields += (
            [f"prob_{c}" for c in classes]
            if cfg.task == "classification"
            else ["time", "event", "risk", *(f"surv_{h:g}" for h in horizons)]
        )
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for i, (slide_id, value) in enumerate(zip(roles["test"], outs, strict=True)):
            r = targets.by_id[slide_id]
            row = {"slide_id": slide_id, "case_id": r["case_id"], "fold": k, "label": r["label"]}
            if cfg.task == "classification":
                row.update({f"prob_{c}": f"{p:.6f}" for c, p in zip(classes, value, strict=True)})
            else:
                row.update(
                    {"time": r["time"], "event": r["event"], "risk": f"{float(value[0]):.6f}"}
                )
                row.update(
                    {f"surv_{h:g}": f"{s:.6f}" for h, s in zip(horizons, surv[i], strict=True)}
                )
            writer.writerow(row)


def _fold_survival(cfg, best, roles, store, targets, logits, horizons, precision) -> np.ndarray:
    """``N x H`` predicted survival of the test slides at ``horizons``: from the hazards of
    the discrete-time model, or for Cox from the Breslow baseline of the training slides."""
    if not horizons:
        return np.zeros((len(logits), 0))
    if cfg.survival_loss != "cox":
        return discrete_survival(logits, targets.edges, horizons)
    train_risk = predict_logits(best, roles["train"], store, precision)[:, 0].numpy()
    rows = [targets.by_id[s] for s in roles["train"]]
    return cox_survival(
        train_risk,
        np.array([r["time"] for r in rows]),
        np.array([r["event"] for r in rows]),
        logits[:, 0].numpy(),
        horizons,
    )


def _nan_stat(stat, values: list[float]) -> float:
    """``stat`` (nanmean, nanstd) over the finite fold values; NaN when none is (a metric
    undefined in every fold, e.g. an AUC without a second class)."""
    values = np.asarray(values, np.float64)
    return float(stat(values)) if np.isfinite(values).any() else float("nan")


def _scores(cfg, rows: list[dict], classes: list[str]) -> dict[str, float]:
    if cfg.task == "classification":
        y = np.array([classes.index(r["label"]) for r in rows])
        probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
        return classification_metrics(y, probs, cfg.ordinal)
    t, e, risk = (np.array([float(r[k]) for r in rows]) for k in ("time", "event", "risk"))
    cols = [k for k in rows[0] if k.startswith("surv_")]  # predicted survival at horizons
    horizons = [float(k[len("surv_") :]) for k in cols]
    survival = np.array([[float(r[k]) for k in cols] for r in rows]) if cols else None
    return survival_metrics(t, e, risk, survival, horizons or None)


def _write_results(
    cfg, out: Path, predictions: list[dict], classes, targets, localization: dict | None = None
) -> dict:
    folds = sorted({int(r["fold"]) for r in predictions})
    per_fold = [
        _scores(cfg, [r for r in predictions if int(r["fold"]) == k], classes) for k in folds
    ]
    names = list(per_fold[0]) if per_fold else []
    pooled_values = _scores(cfg, predictions, classes)
    patients = np.array([r["case_id"] for r in predictions])  # resampled as clusters of slides
    cis = bootstrap_cis(
        lambda idx: _scores(cfg, [predictions[i] for i in idx], classes),
        len(predictions),
        n=cfg.bootstrap,
        seed=cfg.seed,
        groups=patients,
    )
    pooled = {
        name: {"value": pooled_values[name], "ci": list(cis.get(name, (np.nan, np.nan)))}
        for name in names
    }
    metrics = {
        "model": cfg.model,
        "task": cfg.task,
        "folds": per_fold,
        "mean": {n: _nan_stat(np.nanmean, [f[n] for f in per_fold]) for n in names},
        "std": {n: _nan_stat(np.nanstd, [f[n] for f in per_fold]) for n in names},
        "pooled": pooled,
        "n_slides": len(predictions),
        "classes": classes,
    }
    if localization is not None:
        metrics["localization"] = localization
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    with atomic_path(out / "predictions.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(predictions[0]))
        writer.writeheader()
        writer.writerows(predictions)
    return metrics
