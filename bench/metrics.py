"""Confusion-matrix throughput: pipeline.evaluation.metrics.confusion_matrix against the plain ways.

    python bench/metrics.py [--mpix 16] [--classes 19] [--void 0.1] [--miss 0.02] [--repeat 3]

All contenders run side by side in one process on the same random uint8 data and must agree:
  * naive   : per class c, TP / FP / FN from boolean masks (gt == c, pred == c), C passes;
  * textbook: bincount(C * gt[valid] + pred[valid]) after a boolean-mask gather;
  * ours    : metrics.confusion_matrix (one bincount of gt << 8 | pred, chunked, uint16);
  * ours+miss: the same with ``--miss`` of the predictions set to 255 = no prediction and the
    extra "no prediction" column, as evaluate.py scores (a miss is an FN of its class only).
The naive mIoU (nan-mean of the per-class IoUs: classes with a union) must equal mean_iou.
Prints Mpix/s (best of --repeat), the speed-ups, and whether ours meets the 200 Mpix/s target.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from pipeline.evaluation.metrics import confusion_matrix, iou_per_class, mean_iou

TARGET_MPIX_S = 200.0


def naive_iou(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Per-class IoU from boolean masks, one class at a time."""
    valid = gt != ignore_index
    iou = np.full(num_classes, np.nan)
    for c in range(num_classes):
        g = gt == c
        p = (pred == c) & valid
        tp = np.count_nonzero(g & p)
        union = np.count_nonzero(g) + np.count_nonzero(p) - tp
        if union:
            iou[c] = tp / union
    return iou


def textbook_cm(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    valid = gt != ignore_index
    idx = num_classes * gt[valid].astype(np.int64) + pred[valid]
    return np.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def best_time(fn, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mpix", type=float, default=16.0, help="pixels in total, millions")
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--void", type=float, default=0.1, help="fraction of void (255) gt pixels")
    parser.add_argument("--miss", type=float, default=0.02,
                        help="fraction of predictions set to 255 (no prediction) for ours+miss")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 1 <= args.classes <= 255:
        parser.error("--classes must be in 1..255 (uint8 labels, 255 = void)")

    rng = np.random.default_rng(args.seed)
    n = int(args.mpix * 1e6)
    gt = rng.integers(0, args.classes, size=n, dtype=np.uint8)
    gt[rng.random(n) < args.void] = 255
    pred = np.where(rng.random(n) < 0.7, gt, rng.integers(0, args.classes, size=n)).astype(np.uint8)
    pred[gt == 255] = rng.integers(0, args.classes, size=int((gt == 255).sum()), dtype=np.uint8)

    c = args.classes
    t_naive, iou_naive = best_time(lambda: naive_iou(gt, pred, c), args.repeat)
    t_text, cm_text = best_time(lambda: textbook_cm(gt, pred, c), args.repeat)
    t_ours, cm_ours = best_time(lambda: confusion_matrix(gt, pred, num_classes=c), args.repeat)
    assert np.array_equal(cm_ours, cm_text), "fast confusion matrix disagrees with the textbook one"
    assert np.allclose(iou_per_class(cm_ours), iou_naive, equal_nan=True), "IoU disagrees with naive"
    assert np.isclose(mean_iou(cm_ours), np.nanmean(iou_naive)), "mIoU disagrees with naive"

    pred_miss = np.where(rng.random(n) < args.miss, 255, pred).astype(np.uint8)
    t_miss, cm_miss = best_time(lambda: confusion_matrix(gt, pred_miss, num_classes=c, no_prediction=255),
                                args.repeat)
    hit = pred_miss != 255
    assert np.array_equal(cm_miss[:, :c], textbook_cm(gt[hit], pred_miss[hit], c)), "miss: class columns"
    assert np.array_equal(cm_miss[:, c], np.bincount(gt[~hit & (gt != 255)], minlength=c)), "miss column"
    iou_miss = naive_iou(gt, pred_miss, c)  # 255 is no class: a miss is in g, in no p
    assert np.allclose(iou_per_class(cm_miss), iou_miss, equal_nan=True), "miss: IoU disagrees"
    assert np.isclose(mean_iou(cm_miss), np.nanmean(iou_miss)), "miss: mIoU disagrees"

    rates = {name: n / t / 1e6 for name, t in
             (("naive", t_naive), ("textbook", t_text), ("ours", t_ours), ("ours+miss", t_miss))}
    print(f"{n / 1e6:.1f} Mpix, {c} classes, {args.void:.0%} void, best of {args.repeat}, "
          f"{os.cpu_count()} CPU(s), numpy {np.__version__}")
    for name, rate in rates.items():
        print(f"  {name:<9} {rate:8.1f} Mpix/s")
    print(f"  ours / naive    = {rates['ours'] / rates['naive']:.1f}x")
    print(f"  ours / textbook = {rates['ours'] / rates['textbook']:.1f}x")
    met = min(rates["ours"], rates["ours+miss"]) >= TARGET_MPIX_S
    print(f"  target >= {TARGET_MPIX_S:.0f} Mpix/s: {'met' if met else 'NOT met'}")
    return rates


if __name__ == "__main__":
    main()
