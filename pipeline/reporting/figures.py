"""The report's figures: training curves, per-class IoU bars, the confusion matrix and the
image | ground truth | prediction overlays. matplotlib is imported on first use, headless (Agg);
every PNG is written atomically. :mod:`pipeline.reporting.summary` decides what to draw from what exists."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core import atomic

if TYPE_CHECKING:
    from pipeline.reporting.runs import Run


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_training_curves(path: Path, runs: list[Run]) -> bool:
    """Loss (left) and validation mIoU % (right) vs iteration: a row per model, a line per run.
    Returns False (nothing written) when no run has curves (``dvclive/``)."""
    models = sorted({r.model for r in runs if r.log or r.val})
    if not models:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.2 * len(models)), squeeze=False)
    for (ax_loss, ax_val), model in zip(axes, models):
        for run in (r for r in runs if r.model == model):
            label = f"f{run.fold} s{run.seed}"
            if run.log and "loss" in run.log:
                ax_loss.plot(run.log["iter"], run.log["loss"], label=label, lw=1)
            if run.val and "miou" in run.val:
                ax_val.plot(run.val["iter"], 100 * run.val["miou"], marker="o", ms=3, label=label, lw=1)
        ax_loss.set(title=f"{model}: training loss", xlabel="iteration", ylabel="loss")
        ax_val.set(title=f"{model}: validation mIoU", xlabel="iteration", ylabel="mIoU %")
        for ax in (ax_loss, ax_val):
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
    _save(fig, path)
    return True


def plot_class_iou(path: Path, series: dict[str, np.ndarray], class_names: list[str]) -> None:
    """Grouped bars of per-class IoU % ([C] float, nan = class absent), one colour per series."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(min(24.0, 2 + 0.25 * len(class_names) * (len(series) + 1)), 4.5))
    width = 0.8 / len(series)
    x = np.arange(len(class_names))
    for i, (label, iou) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, 100 * np.nan_to_num(iou), width,
               label=label)
    ax.set_xticks(x, class_names, rotation=45, ha="right")
    ax.set(ylabel="IoU %", title="per-class IoU")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def plot_confusion(path: Path, cm: np.ndarray, class_names: list[str], title: str) -> None:
    """Row-normalised confusion matrix (rows: ground truth, columns: prediction), in %."""
    plt = _pyplot()
    rows = cm.sum(axis=1, keepdims=True)
    norm = 100 * cm / np.where(rows > 0, rows, 1)
    size = max(5.0, 0.5 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=100)
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=90, fontsize=8)
    ax.set_yticks(ticks, class_names, fontsize=8)
    if len(class_names) <= 20:
        for (i, j), value in np.ndenumerate(norm):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=6,
                    color="white" if value > 50 else "black")
    ax.set(xlabel="prediction", ylabel="ground truth", title=title)
    fig.colorbar(im, ax=ax, label="% of the row", fraction=0.046)
    _save(fig, path)


def compose_overlay(image: np.ndarray, pred: np.ndarray, palette: np.ndarray,
                    gt: np.ndarray | None = None, min_height: int = 256) -> np.ndarray:
    """image (HxWx3 uint8) | gt colours (HxW ids, when given) | prediction colours, separated by
    4 px of white and enlarged k times (nearest) below ``min_height``: kH x (..) x 3 uint8."""
    panels = [image] + ([palette[gt]] if gt is not None else []) + [palette[pred]]
    gap = np.full((image.shape[0], 4, 3), 255, dtype=np.uint8)
    canvas = np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)
    k = max(1, min_height // image.shape[0])
    return np.repeat(np.repeat(canvas, k, axis=0), k, axis=1)
