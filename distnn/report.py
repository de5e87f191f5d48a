"""The figures of an evaluation (distnn.evaluate), as PNG files of fixed pixel sizes:
confusion.png 800 × 800, reliability.png 600 × 600, hardest.png 800 × 800."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

DPI = 100


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, on any node: no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=DPI, format="png")  # no bbox "tight": the stated size holds
    _pyplot().close(fig)
    tmp.replace(path)


def confusion(cm: np.ndarray, classes: list[str], path: Path) -> None:
    """Rows (true classes) normalised to sum to 1; class names on both axes (up to 50)."""
    plt = _pyplot()
    support = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, support, out=np.zeros_like(cm, dtype=float), where=support > 0)
    fig, ax = plt.subplots(figsize=(8, 8))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    k = len(classes)
    if k <= 50:
        ax.set_xticks(range(k), classes, rotation=90, fontsize=max(5, 12 - k // 5))
        ax.set_yticks(range(k), classes, fontsize=max(5, 12 - k // 5))
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if norm[i, j] >= 0.005:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")  # fmt: skip
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"confusion (rows normalised), top-1 {np.trace(cm) / cm.sum():.4f}")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.subplots_adjust(left=0.12, right=0.95, bottom=0.12, top=0.94)
    _save(fig, path)


def reliability(calibration: dict[str, Any], ece: float, path: Path) -> None:
    """Accuracy against confidence per bin, with the diagonal of perfect calibration."""
    plt = _pyplot()
    count, conf, correct = (np.asarray(calibration[k]) for k in ("count", "confidence", "correct"))
    bins = calibration["bins"]
    edges = np.linspace(0, 1, bins + 1)
    acc = np.divide(correct, count, out=np.zeros_like(count), where=count > 0)
    mean_conf = np.divide(conf, count, out=np.zeros_like(count), where=count > 0)
    fig, ax = plt.subplots(figsize=(6, 6))
    used = count > 0
    ax.bar(edges[:-1][used], acc[used], width=1 / bins, align="edge", edgecolor="black",
           label="accuracy")  # fmt: skip
    ax.bar(edges[:-1][used], mean_conf[used], width=1 / bins, align="edge", fill=False,
           edgecolor="red", linewidth=1.5, label="mean confidence")  # fmt: skip
    ax.plot([0, 1], [0, 1], "k--", label="perfectly calibrated")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability, ECE {ece:.4f} ({bins} bins)")
    ax.legend(loc="upper left")
    _save(fig, path)


def hardest(images: list[tuple[np.ndarray, str, str, float]], path: Path) -> None:
    """A 4 × 4 grid of (image, true class, predicted class, probability of the true class)."""
    plt = _pyplot()
    fig, axes = plt.subplots(4, 4, figsize=(8, 8))
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, true, pred, p_true) in zip(axes.flat, images, strict=False):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(f"{true} → {pred}\np(true) {p_true:.3f}", fontsize=8)
    fig.suptitle("lowest probability of the true class (true → predicted)")
    fig.subplots_adjust(left=0.03, right=0.97, bottom=0.03, top=0.88, hspace=0.45, wspace=0.1)
    _save(fig, path)
