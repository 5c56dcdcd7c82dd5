"""``cpath train-mil``: slide-level MIL training with patient-grouped cross-validation.

    cpath train-mil --features runs/feats --labels labels.csv --model abmil --folds 5 --out runs/mil
    cpath train-mil --features runs/feats --labels labels.csv --task survival --survival_loss nll

Outputs under ``out``: ``splits.csv`` (made unless ``--splits`` is given; reused on a rerun
while it fits the labelled slides, their patients and labels, and the split settings),
``fold_<k>/model.ckpt`` (the best epoch by validation loss), ``predictions.csv``
(out-of-fold: slide_id, case_id, fold, label, and per-class probabilities, or time, event,
risk and ``surv_<t>``, the predicted survival at the quartiles ``t`` of the patients' event
times), ``metrics.json`` (per fold, mean +- std, and a bootstrap 95% CI on the pooled
out-of-fold predictions, resampling patients; for survival Harrell's ``c_index``, the
integrated time-dependent AUC ``td_auc`` and the integrated Brier score ``ibs`` at those
times) and ``config.yaml``. Finished folds are reused on a rerun while the labels (their
content), features, splits and training settings are the same; reporting settings
(``bootstrap``, ``progress``, ``device``, ...) do not count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass
class TrainMILConfig:
    """Train a MIL aggregator on per-slide features with k-fold cross-validation.

    Args:
        features: folder of feature files (<slide_id>.h5) from `cpath extract`.
        labels: CSV with slide_id, case_id and label (classification) or time, event (survival).
        model: abmil, clam_sb, clam_mb, transmil, dsmil, mean or max.
        model_args: constructor arguments of the model (hidden, dropout, ...).
        task: classification or survival.
        folds: cross-validation folds (grouped by case_id, stratified by label or event).
        val_share: share of each fold's training patients used for early stopping (0: none,
            train all epochs and keep the last).
        splits: a splits.csv to use (default: OUT/splits.csv when it fits the labels and the
            split settings, else new ones written there).
        out: run folder.
        epochs: most training epochs per fold.
        patience: epochs without validation improvement before stopping.
        lr: AdamW learning rate (cosine schedule).
        weight_decay: AdamW weight decay.
        batch_size: bags per step (zero-padded, masked).
        max_instances: random instances kept per training bag (None: all).
        standardize: scale each feature by the mean and std of the fold's training tiles.
        balanced: sample training bags with class-balanced weights.
        class_weighted: weight the cross-entropy of each class by the inverse of its share
            of the fold's training slides (n / (K n_c), scikit-learn's "balanced" class
            weights), usually with balanced false.
        bag_weight: weight of the bag loss against CLAM/DSMIL auxiliary losses.
        survival_loss: nll (discrete time) or cox.
        cox_ties: how the cox loss handles tied event times: efron (Efron, 1977) or breslow
            (Breslow, 1974), as torchsurv's neg_partial_log_likelihood.
        time_bins: discrete-time bins for the nll loss: quantiles of the event times of each
            fold's training patients (one time per patient).
        ordinal: labels are ordered (adds quadratic weighted kappa).
        bootstrap: bootstrap resamples for the confidence intervals.
        missing: labelled slides without a feature file: error, or skip them.
        seed: seed of splits, sampling and initialisation.
        device: auto (a GPU when torch sees one, else the CPU), cpu, cuda or cuda:N; training
            and prediction run there.
        precision: auto (bf16-mixed on a GPU, else 32-true), 32-true or bf16-mixed.
        progress: show progress bars.
        store: where the bags' features are held while training: memory (all slides in
            one float32 tensor, 4 bytes per feature), disk (each bag read from its feature
            file when needed, with a small cache; memory does not grow with the cohort), or
            auto (memory when the float32 size fits memory_budget_gb, else disk). Bags,
            models and predictions are the same with either.
        memory_budget_gb: most GB (10^9 bytes) of float32 features that store auto holds in
            memory (None: a quarter of the machine's memory).
        tile_labels: CSV of tile-level ground truth (columns slide_id, index: the tile's row
            in the slide's feature file, positive: 1 for tiles of the class to localise, e.g.
            tumour, else 0). Each test slide with both kinds gets the AUC of its fold model's
            tile scores (attention, or instance scores) against them: the localization AUC
            in metrics.json, mean over slides with a bootstrap CI by patient.
        strategy: plain (the model on whole training bags), supcon or mhim. supcon: SC-MIL
            (Juyal et al., WACV 2024) for classification with abmil, clam_sb or transmil: a
            projection head (Linear, ReLU, Linear to 128-d; Khosla et al., NeurIPS 2020) on
            the bag embedding, trained with the model and not used for prediction; the loss
            is w * supervised contrastive loss of the projections + (1 - w) * the task's
            loss (cross-entropy), w a cosine from 1 to 0 over supcon_curriculum_epochs;
            training batches of supcon_batch_size bags hold at least two bags of every class
            (balanced does not apply). Validation, early stopping and prediction use the
            cross-entropy and the model alone. mhim: masked hard instance
            mining (MHIM-MIL; Tang et al., ICCV 2023) for abmil, transmil and dsmil. A
            momentum teacher (a copy of the model, updated after each optimiser step as an
            exponential moving average of it, never by gradients) scores the instances of
            each training bag with its attention (DSMIL: its instance classifier's highest
            class score, as the authors' MHIM-v2 code; in training mode, dropout on); the model
            trains on the bag without the masked instances (random, least attended and most
            attended, see the mhim_ settings), with the task's loss plus mhim_alpha times a
            soft cross-entropy from the teacher's whole-bag embedding to its own. Validation,
            prediction and the saved model are the model's (the student's) on whole bags.
        teacher_init: with mhim, a finished plain run of the same model and model_args whose
            fold models (RUN/fold_<k>/model.ckpt) initialise each fold's teacher; it must
            have been trained on the same splits (pass --splits RUN/splits.csv). None: the
            teacher starts as a copy of the freshly initialised model.
        mhim_student_init: with teacher_init, what of the fold model also initialises the
            model: none, embed (its instance embedding, the reference's ABMIL setting) or all.
        mhim_mask_ratio: share of each bag's instances masked at random.
        mhim_mask_ratio_l: share masked among the lowest teacher attention.
        mhim_mask_ratio_h: share masked among the highest teacher attention: a random
            mhim_mask_ratio_hr of the ceil(n * mhim_mask_ratio_h / mhim_mask_ratio_hr) most
            attended instances.
        mhim_mask_ratio_hr: the randomly masked share of the high-attention candidates.
        mhim_h_decay: decay mhim_mask_ratio_h to 0 over the training steps (cosine).
        mhim_alpha: weight of the teacher-student consistency loss.
        mhim_temp_t: softmax temperature of the teacher's bag embedding.
        mhim_temp_s: softmax temperature of the model's bag embedding.
        mhim_momentum: momentum m of the teacher update (teacher <- m teacher + (1-m) model).
        mhim_momentum_cosine: raise the momentum from mhim_momentum to mhim_momentum_final
            over the training steps (cosine).
        mhim_momentum_final: the final momentum of mhim_momentum_cosine.
        supcon_temperature: temperature of the supervised contrastive loss (Khosla et al.'s
            0.07; the loss is not rescaled: base temperature = temperature).
        supcon_curriculum_epochs: epochs over which the contrastive share goes from 1 to 0
            (cross-entropy alone after them; None: half the epochs). The paper's schedule
            and temperature are not public: these defaults are this tool's choices.
        supcon_batch_size: bags per supcon training step (zero-padded, masked; at least two
            per class), in place of batch_size.
        init_from: a pretrained aggregator to start from (transfer; Shao et al., "Do Multiple
            Instance Learning Models Transfer?", ICML 2025): a model.ckpt of a finished
            train-mil run (RUN/fold_<k>/model.ckpt, or RUN when it has one fold) of the same
            model and model_args, trained on features of the same encoder (weights' SHA-256
            and output, as the feature files record them; refused otherwise). Its body
            initialises every fold's model; its head (the layers of its task's classes) is
            dropped and a new one trained for this task. Its feature standardization is
            kept (standardize does not apply): the body sees the features as it was trained.
        init_body_lr_scale: with init_from, the body's learning rate as a share of lr (the
            new head trains at lr).
        shots: train each fold on this many slides per class drawn from its training slides
            (few-shot; seeded by seed and fold; validation and test slides unchanged). None:
            all of them.
        train_fraction: train each fold on this share of its training slides, drawn per class
            (at least one of each; seeded like shots). 1: all of them.
    """

    features: Path | None = None
    labels: Path | None = None
    model: str = "abmil"
    model_args: dict[str, Any] = field(default_factory=dict)
    task: Literal["classification", "survival"] = "classification"
    folds: int = 5
    val_share: float = 0.2
    splits: Path | None = None
    out: Path = Path("runs/mil")
    epochs: int = 30
    patience: int = 8
    lr: float = 2.0e-4
    weight_decay: float = 1.0e-2
    batch_size: int = 1
    max_instances: int | None = 4096
    standardize: bool = True
    balanced: bool = True
    class_weighted: bool = False
    bag_weight: float = 0.7
    survival_loss: Literal["nll", "cox"] = "nll"
    cox_ties: Literal["efron", "breslow"] = "efron"
    time_bins: int = 4
    ordinal: bool = False
    bootstrap: int = 1000
    missing: Literal["error", "skip"] = "error"
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "32-true", "bf16-mixed"] = "auto"
    progress: bool = True
    store: Literal["auto", "memory", "disk"] = "auto"
    memory_budget_gb: float | None = None
    tile_labels: Path | None = None
    strategy: Literal["plain", "supcon", "mhim"] = "plain"
    teacher_init: Path | None = None
    mhim_student_init: Literal["none", "embed", "all"] = "none"
    mhim_mask_ratio: float = 0.5
    mhim_mask_ratio_l: float = 0.0
    mhim_mask_ratio_h: float = 0.01
    mhim_mask_ratio_hr: float = 0.5
    mhim_h_decay: bool = True
    mhim_alpha: float = 0.1
    mhim_temp_t: float = 0.1
    mhim_temp_s: float = 1.0
    mhim_momentum: float = 0.9999
    mhim_momentum_cosine: bool = False
    mhim_momentum_final: float = 1.0
    supcon_temperature: float = 0.07
    supcon_curriculum_epochs: int | None = None
    supcon_batch_size: int = 16
    init_from: Path | None = None
    init_body_lr_scale: float = 0.1
    shots: int | None = None
    train_fraction: float = 1.0


def run(cfg: TrainMILConfig) -> int:
    from pipeline.mil.training import train_cv

    metrics = train_cv(cfg)
    summary = metrics["pooled"]
    text = ", ".join(
        f"{k} {v['value']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]" for k, v in summary.items()
    )
    folds = len(metrics["folds"])
    print(f"train-mil {cfg.model} ({cfg.task}, {folds} folds): {text} -> {cfg.out}")
    return 0
