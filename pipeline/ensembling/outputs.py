"""The outputs of a search as other steps and people see them: the names of the files read back
(weights.json by ``--apply``, metrics.json and members.json by the holdout scores and the
reports, confusion.json), the ensemble table as text and the heatmap of the grid."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.core import atomic
from pipeline.core.names import ENSEMBLE_ROWS, METRICS_FILE

WEIGHTS, METRICS, MEMBERS = "weights.json", METRICS_FILE, "members.json"
CONFUSION = "confusion.json"  # {row: [C][C] OOF confusion matrix} of the table's rows (reports)
HEATMAP = "heatmap.png"


def pct(value: float | None) -> str:
    """A fraction as a percentage with two decimals, "-" for a missing one."""
    return "-" if value is None else f"{100 * value:.2f}"


def format_table(metrics: Mapping[str, Any]) -> str:
    """The ensemble table (percent) of a metrics.json dict."""
    lines = [f"{'OOF':<14} {'mIoU %':>7} {'mVC8 %':>7} {'mVC16 %':>7}"]
    for row in ENSEMBLE_ROWS:
        lines.append(f"{row:<14} {pct(metrics[f'{row}_mIoU']):>7} "
                     f"{pct(metrics[f'{row}_mVC8']):>7} {pct(metrics[f'{row}_mVC16']):>7}")
    if metrics.get("partial"):
        folds = ", ".join(f"fold {k}: {n}" for k, n in (metrics.get("missing_folds") or {}).items())
        lines.append(f"partial: fitted on {metrics['oof_frames']} of the "
                     f"{metrics['oof_frames'] + metrics['oof_frames_missing']} train frames "
                     f"({metrics['oof_frames_missing']} missing{': ' + folds if folds else ''}; "
                     f"ensemble.allow_partial)")
    if metrics.get("oof_sampled"):
        lines.append(f"sampled: fitted on {metrics['oof_frames']} OOF frames of infer.oof_sample "
                     f"{metrics.get('oof_sample')}, not every train frame")
    return "\n".join(lines)


def plot_heatmap(path: Path, miou: np.ndarray, alphas: Sequence[float], betas: Sequence[float],
                 best: tuple[float, float]) -> None:
    """OOF mIoU (%) over the grid (rows alpha, columns beta), best point marked; atomic PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5.5))
    im = ax.imshow(100 * miou, origin="lower", aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(betas)), [f"{b:g}" for b in betas], rotation=90, fontsize=7)
    ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas], fontsize=7)
    ax.set_xlabel("beta (weight of P_A)")
    ax.set_ylabel("alpha (weight of P_W)")
    i, j = list(alphas).index(best[0]), list(betas).index(best[1])
    ax.plot(j, i, marker="*", color="red", markersize=14, markeredgecolor="white")
    ax.set_title(f"OOF mIoU of P_S + alpha P_W + beta P_A; best {100 * miou[i, j]:.2f} "
                 f"at alpha={best[0]:g}, beta={best[1]:g}", fontsize=9)
    fig.colorbar(im, ax=ax, label="mIoU %")
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
