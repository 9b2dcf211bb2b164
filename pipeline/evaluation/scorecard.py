"""The score card of one evaluation: a JSON-ready summary of a confusion matrix and mVC values,
and its per-class text table (percent).

Pure numpy over :mod:`pipeline.evaluation.metrics` and :mod:`pipeline.evaluation.consistency`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from pipeline.evaluation.consistency import VC_WINDOWS
from pipeline.evaluation.metrics import (MIOU_DEFINITION, class_accuracy, class_counts, iou_per_class,
                                         mean_iou, pixel_accuracy)


def _num(value: float) -> float | None:
    return None if value is None or np.isnan(value) else float(value)


def summarize(cm: np.ndarray, *, class_names: Sequence[str],
              vc: Mapping[int, float] | None = None) -> dict:
    """JSON-ready summary (fractions in 0..1, nan -> None) of a confusion matrix ([C, C], or
    [C, C + 1] with a no-prediction column) and mVC values.

    Keys: mIoU, miou_definition (:data:`MIOU_DEFINITION`, the one place the definition is
    written), pixel_accuracy, mean_class_accuracy (over the classes with ground-truth pixels:
    recall is undefined elsewhere), mVC8, mVC16 (None when ``vc`` lacks them, plus mVC<n> for
    any other n in ``vc``), labelled_pixels, unpredicted_pixels (labelled pixels without a
    prediction, 0 for a [C, C] matrix), and per_class {name: {iou, accuracy, gt_pixels,
    pred_pixels}}.
    """
    cm = np.asarray(cm)
    if len(class_names) != cm.shape[0] or len(set(class_names)) != len(class_names):
        raise ValueError(f"need {cm.shape[0]} distinct class names, got {len(class_names)}")
    _, predicted, gt = class_counts(cm)
    iou, acc = iou_per_class(cm), class_accuracy(cm)
    present = gt > 0
    summary: dict = {
        "mIoU": _num(mean_iou(cm)),
        "miou_definition": MIOU_DEFINITION,
        "pixel_accuracy": _num(pixel_accuracy(cm)),
        "mean_class_accuracy": _num(acc[present].mean() if present.any() else float("nan")),
    }
    vc = dict(vc or {})
    for n in sorted(set(VC_WINDOWS) | set(vc)):
        summary[f"mVC{n}"] = _num(vc.get(n))
    summary["labelled_pixels"] = int(gt.sum())
    summary["unpredicted_pixels"] = int(gt.sum() - predicted.sum())
    summary["per_class"] = {
        name: {"iou": _num(iou[c]), "accuracy": _num(acc[c]),
               "gt_pixels": int(gt[c]), "pred_pixels": int(predicted[c])}
        for c, name in enumerate(class_names)}
    return summary


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def format_table(summary: dict) -> str:
    """Per-class IoU / accuracy table plus the totals, in percent ("-" for undefined)."""
    width = max([5] + [len(name) for name in summary["per_class"]])
    lines = [f"{'class':<{width}}  {'IoU %':>7}  {'Acc %':>7}  {'gt pixels':>12}"]
    for name, row in summary["per_class"].items():
        lines.append(f"{name:<{width}}  {_pct(row['iou']):>7}  {_pct(row['accuracy']):>7}  "
                     f"{row['gt_pixels']:>12d}")
    lines.append("-" * len(lines[0]))
    totals = [("mIoU", "mIoU"), ("pixel acc", "pixel_accuracy"), ("mean acc", "mean_class_accuracy")]
    totals += [(key, key) for key in summary if key.startswith("mVC")]
    lines.append("  ".join(f"{label} {_pct(summary[key])}" for label, key in totals))
    notes = [f"mIoU = {summary['miou_definition']}"] if summary.get("miou_definition") else []
    if summary.get("unpredicted_pixels"):
        notes.append(f"{summary['unpredicted_pixels']} labelled pixel(s) without a prediction "
                     "count as misses of their class")
    if notes:
        lines.append("; ".join(notes))
    return "\n".join(lines)
