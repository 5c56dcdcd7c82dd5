"""Figures of the evaluation report (matplotlib, Agg): ROC curves, confusion matrices,
few-shot curves, a PCA of tile features, and risk groups of survival tasks."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, auc, roc_curve  # noqa: E402
from sklearn.preprocessing import label_binarize  # noqa: E402

from pipeline.io import atomic_path  # noqa: E402


def _save(fig, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return str(path)


def roc_curves(
    path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], classes, title: str
) -> str:
    """One ROC curve per encoder: of the second class for two classes, else micro-averaged
    one-vs-rest. ``curves``: encoder -> (class indices N, probabilities N x C)."""
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for name, (y, probs) in curves.items():
        if probs.shape[1] == 2:
            fpr, tpr, _ = roc_curve(y, probs[:, 1])
        else:
            onehot = label_binarize(y, classes=np.arange(probs.shape[1]))
            fpr, tpr, _ = roc_curve(onehot.ravel(), probs.ravel())
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    positive = f"'{classes[1]}'" if len(classes) == 2 else "micro-average"
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{title}\n{positive}")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def confusion_matrices(
    path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], classes, title: str
) -> str:
    """Row-normalised confusion matrix of each encoder's arg-max predictions."""
    fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves), 3.4), squeeze=False)
    for ax, (name, (y, probs)) in zip(axes[0], curves.items(), strict=True):
        ConfusionMatrixDisplay.from_predictions(
            y,
            probs.argmax(1),
            labels=np.arange(len(classes)),
            display_labels=list(classes),
            normalize="true",
            ax=ax,
            colorbar=False,
            values_format=".2f",
            cmap="Blues",
        )
        ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def fewshot_curves(path: Path, fewshot: dict[str, dict[int, dict]], title: str) -> str:
    """Mean balanced accuracy against shots per class, with a +- 1 std band."""
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    for name, by_k in fewshot.items():
        ks = sorted(int(k) for k in by_k)
        mean = np.array([by_k[k]["mean"] for k in ks])
        std = np.array([by_k[k]["std"] for k in ks])
        ax.plot(ks, mean, marker="o", label=name)
        ax.fill_between(ks, mean - std, mean + std, alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="examples per class", ylabel="balanced accuracy", title=title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def embeddings(
    path: Path,
    features: dict[str, np.ndarray],
    labels: np.ndarray,
    groups: np.ndarray,
    group_name: str,
    title: str,
) -> str:
    """PCA of each encoder's tile features, coloured by label and by slide (or site): slide
    or site clusters show features that carry batch effects."""
    fig, axes = plt.subplots(len(features), 2, figsize=(8, 3.6 * len(features)), squeeze=False)
    for row, (name, x) in zip(axes, features.items(), strict=True):
        xy = PCA(n_components=2, random_state=0).fit_transform(x - x.mean(0))
        for ax, values, what in ((row[0], labels, "label"), (row[1], groups, group_name)):
            kinds = np.unique(values)
            cmap = plt.get_cmap("tab10" if len(kinds) <= 10 else "tab20")
            for i, v in enumerate(kinds):
                sel = values == v
                ax.scatter(
                    xy[sel, 0],
                    xy[sel, 1],
                    s=6,
                    alpha=0.7,
                    color=cmap(i % cmap.N),
                    label=str(v) if len(kinds) <= 12 else None,
                )
            ax.set_title(f"{name}: by {what}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            if len(kinds) <= 12:
                ax.legend(fontsize=6, markerscale=2)
    fig.suptitle(f"{title}: PCA of tile features", fontsize=10)
    return _save(fig, path)


def risk_groups(path: Path, risks: dict[str, np.ndarray], y: np.ndarray, title: str) -> str:
    """Kaplan-Meier curves of the patients above and below each encoder's median risk.
    ``y``: N x 2 (time, event)."""
    fig, axes = plt.subplots(1, len(risks), figsize=(4 * len(risks), 3.4), squeeze=False)
    time, event = y[:, 0], y[:, 1]
    for ax, (name, risk) in zip(axes[0], risks.items(), strict=True):
        high = risk > np.median(risk)
        for sel, label in ((~high, "low risk"), (high, "high risk")):
            t, s = kaplan_meier(time[sel], event[sel])
            ax.step(t, s, where="post", label=f"{label} (n={int(sel.sum())})")
        ax.set(xlabel="time", ylabel="survival", ylim=(0, 1.05), title=name)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def kaplan_meier(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Product-limit survival estimate at 0 and at each event time."""
    times = np.unique(time[event > 0])
    surv, s = [1.0], 1.0
    for t in times:
        at_risk = (time >= t).sum()
        s *= 1 - ((time == t) & (event > 0)).sum() / max(at_risk, 1)
        surv.append(s)
    return np.concatenate([[0.0], times]), np.array(surv)
