"""Confusion matrix and IoU / accuracy against hand-computed values and a naive reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluation import metrics
from pipeline.evaluation.metrics import (ConfusionMatrix, class_accuracy, confusion_matrix, iou_per_class,
                                         mean_iou, pixel_accuracy)
from pipeline.evaluation.scorecard import summarize


def naive_cm(gt, pred, num_classes, ignore_index=255):
    """Pixel-by-pixel reference."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    for g, p in zip(np.ravel(gt).tolist(), np.ravel(pred).tolist()):
        if g != ignore_index:
            cm[g, p] += 1
    return cm


def test_perfect_prediction_is_diagonal():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 5, size=(20, 30), dtype=np.uint8)
    gt[:3] = 255
    cm = confusion_matrix(gt, gt, num_classes=5)
    assert np.array_equal(cm, np.diag(np.diag(cm)))
    assert cm.sum() == 17 * 30
    assert mean_iou(cm) == 1.0 and pixel_accuracy(cm) == 1.0


def test_planted_confusion_hand_computed():
    gt = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 255], dtype=np.uint8)
    pred = np.array([0, 0, 0, 1, 1, 1, 2, 2, 0, 1], dtype=np.uint8)
    cm = confusion_matrix(gt, pred, num_classes=3)
    # rows = gt: class 0 -> pred 0,0,0,1; class 1 -> 1,1,2; class 2 -> 2,0; the void pixel is dropped
    assert cm.tolist() == [[3, 1, 0], [0, 2, 1], [1, 0, 1]]
    # class 0: TP 3, FP 1 (the gt-2 pixel), FN 1 -> 3 / 5
    # class 1: TP 2, FP 1 (the gt-0 pixel), FN 1 -> 2 / 4
    # class 2: TP 1, FP 1 (the gt-1 pixel), FN 1 -> 1 / 3
    assert iou_per_class(cm) == pytest.approx([3 / 5, 2 / 4, 1 / 3])
    assert mean_iou(cm) == pytest.approx((3 / 5 + 2 / 4 + 1 / 3) / 3)
    assert class_accuracy(cm) == pytest.approx([3 / 4, 2 / 3, 1 / 2])
    assert pixel_accuracy(cm) == pytest.approx(6 / 9)


def test_ignore_pixels_never_count():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 4, size=1000, dtype=np.uint8)
    pred = rng.integers(0, 4, size=1000, dtype=np.uint8)
    void = rng.random(1000) < 0.3
    gt_void = np.where(void, 255, gt).astype(np.uint8)
    # predictions on void pixels may be anything, even values that are no class
    pred_junk = np.where(void, 200, pred).astype(np.uint8)
    cm = confusion_matrix(gt_void, pred_junk, num_classes=4)
    assert np.array_equal(cm, confusion_matrix(gt[~void], pred[~void], num_classes=4))
    assert cm.sum() == (~void).sum()
    # another ignore index works the same way, on the generic path too
    gt0 = np.where(void, 9, gt)
    assert np.array_equal(confusion_matrix(gt0, pred_junk.astype(np.int64), num_classes=4,
                                           ignore_index=9), cm)


def test_predicted_class_absent_from_gt_counts_with_iou_zero():
    gt = np.array([0, 0, 1, 1], dtype=np.uint8)
    pred = np.array([0, 3, 1, 1], dtype=np.uint8)
    cm = confusion_matrix(gt, pred, num_classes=4)
    iou = iou_per_class(cm)
    # class 0: 1 / (1 + 0 + 1); class 1: 2 / 2; class 2: neither in gt nor pred -> nan, left out;
    # class 3: predicted once, never in gt -> 0 / 1, and counted (union 1 > 0)
    assert iou[:2] == pytest.approx([0.5, 1.0]) and math.isnan(iou[2]) and iou[3] == 0.0
    assert mean_iou(cm) == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert math.isnan(class_accuracy(cm)[3])


def test_standard_miou_example_of_issue_12():
    """gt [0,0,1,1], pred [0,2,1,1], 3 classes: IoU 1/2, 2/2 and 0/1 (class 2 predicted, not in
    the gt) -> 50.0 as MMSegmentation / Cityscapes / VSPW report it, not 75.0 (gt classes only)."""
    cm = confusion_matrix(np.array([0, 0, 1, 1], np.uint8), np.array([0, 2, 1, 1], np.uint8),
                          num_classes=3)
    assert 100 * mean_iou(cm) == pytest.approx(50.0)
    assert summarize(cm, class_names=["a", "b", "c"])["mIoU"] == pytest.approx(0.5)
    assert math.isnan(mean_iou(np.zeros((3, 3), np.int64)))  # no union anywhere


def test_no_prediction_is_a_miss_only():
    # gt:   0  0  0  1  1  2  void
    # pred: 0 255 1  1 255 2  255
    gt = np.array([0, 0, 0, 1, 1, 2, 255], dtype=np.uint8)
    pred = np.array([0, 255, 1, 1, 255, 2, 255], dtype=np.uint8)
    cm = confusion_matrix(gt, pred, num_classes=3, no_prediction=255)
    # rows = gt; columns 0..2 = classes, column 3 = no prediction; the void pixel is dropped
    assert cm.tolist() == [[1, 1, 0, 1], [0, 1, 0, 1], [0, 0, 1, 0]]
    # class 0: TP 1, FP 0, FN 2 (a class-1 and a missed pixel) -> 1/3
    # class 1: TP 1, FP 1 (the gt-0 pixel), FN 1 (missed) -> 1/3; no FP from the misses
    # class 2: TP 1 -> 1
    assert iou_per_class(cm) == pytest.approx([1 / 3, 1 / 3, 1.0])
    assert mean_iou(cm) == pytest.approx((1 / 3 + 1 / 3 + 1) / 3)
    assert class_accuracy(cm) == pytest.approx([1 / 3, 1 / 2, 1.0])
    assert pixel_accuracy(cm) == pytest.approx(3 / 6)
    summary = summarize(cm, class_names=["a", "b", "c"])
    assert summary["labelled_pixels"] == 6 and summary["unpredicted_pixels"] == 2
    assert summary["per_class"]["a"]["pred_pixels"] == 1 and summary["per_class"]["a"]["gt_pixels"] == 3
    # the generic path gives the same; without no_prediction, 255 stays an error
    assert np.array_equal(confusion_matrix(gt.astype(np.int32), pred.astype(np.int64), num_classes=3,
                                           no_prediction=255), cm)
    with pytest.raises(ValueError, match="prediction value 255"):
        confusion_matrix(gt, pred, num_classes=3)
    with pytest.raises(ValueError, match="prediction value 7"):
        confusion_matrix(gt, np.where(pred == 1, 7, pred).astype(np.uint8), num_classes=3,
                         no_prediction=255)
    with pytest.raises(ValueError, match="is a class"):
        confusion_matrix(gt, pred, num_classes=3, no_prediction=2)


@pytest.mark.parametrize("num_classes", [1, 3, 19, 255])
def test_no_prediction_column_fast_path_matches_naive(num_classes, monkeypatch):
    monkeypatch.setattr(metrics, "_CHUNK", 257)
    rng = np.random.default_rng(10 + num_classes)
    gt = rng.integers(0, num_classes, size=(30, 40)).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.1] = 255
    pred = rng.integers(0, num_classes, size=gt.shape).astype(np.uint8)
    pred[rng.random(gt.shape) < 0.2] = 255
    labelled = gt != 255
    expected = np.zeros((num_classes, num_classes + 1), np.int64)
    for g, p in zip(gt[labelled].tolist(), pred[labelled].tolist()):
        expected[g, num_classes if p == 255 else p] += 1
    acc = ConfusionMatrix(num_classes=num_classes, no_prediction=255)
    acc.update(gt, pred)
    assert np.array_equal(acc.matrix, expected)
    assert np.array_equal(confusion_matrix(gt.astype(np.int16), pred.astype(np.int16),
                                           num_classes=num_classes, no_prediction=255), expected)
    # the class columns equal the plain matrix of the predicted pixels only
    predicted = labelled & (pred != 255)
    assert np.array_equal(expected[:, :num_classes],
                          confusion_matrix(gt[predicted], pred[predicted], num_classes=num_classes))
    with pytest.raises(ValueError, match="no-prediction"):
        acc.merge(ConfusionMatrix(num_classes=num_classes, no_prediction=254 if num_classes < 254 else None))


def test_streaming_equals_one_shot_and_merge():
    rng = np.random.default_rng(2)
    gt = rng.integers(0, 6, size=(7, 13, 17), dtype=np.uint8)
    gt[rng.random(gt.shape) < 0.1] = 255
    pred = rng.integers(0, 6, size=gt.shape, dtype=np.uint8)
    whole = confusion_matrix(gt, pred, num_classes=6)
    a, b = ConfusionMatrix(num_classes=6), ConfusionMatrix(num_classes=6)
    for i in range(4):
        a.update(gt[i], pred[i])
    for i in range(4, 7):
        b.update(gt[i], pred[i])
    assert not np.array_equal(a.matrix, whole)
    assert np.array_equal(a.merge(b).matrix, whole)
    with pytest.raises(ValueError):
        a.merge(ConfusionMatrix(num_classes=5))


@pytest.mark.parametrize("num_classes", [1, 2, 16, 19, 124, 254, 255, 256])
def test_fast_path_matches_naive(num_classes, monkeypatch):
    monkeypatch.setattr(metrics, "_CHUNK", 257)  # several chunks, one partial
    rng = np.random.default_rng(num_classes)
    gt = rng.integers(0, num_classes, size=(40, 50)).astype(np.uint8)
    if num_classes <= 255:
        gt[rng.random(gt.shape) < 0.1] = 255
    pred = rng.integers(0, num_classes, size=gt.shape).astype(np.uint8)
    expected = naive_cm(gt, pred, num_classes)
    assert np.array_equal(confusion_matrix(gt, pred, num_classes=num_classes), expected)
    # generic path (wider dtypes) agrees
    assert np.array_equal(confusion_matrix(gt.astype(np.int32), pred.astype(np.int64),
                                           num_classes=num_classes), expected)


def test_many_classes_generic_path():
    rng = np.random.default_rng(3)
    gt = rng.integers(0, 300, size=3000).astype(np.int16)
    gt[:100] = 255  # void, even though 255 < num_classes
    pred = rng.integers(0, 300, size=3000).astype(np.int16)
    assert np.array_equal(confusion_matrix(gt, pred, num_classes=300), naive_cm(gt, pred, 300))


@pytest.mark.parametrize("dtype", [np.uint8, np.int64])
def test_out_of_range_raises(dtype):
    gt = np.array([0, 1, 2, 255], dtype=dtype)
    with pytest.raises(ValueError, match="prediction value 3"):
        confusion_matrix(gt, np.array([0, 1, 3, 0], dtype=dtype), num_classes=3)
    with pytest.raises(ValueError, match="ground-truth value 7"):
        confusion_matrix(np.array([0, 7, 2, 255], dtype=dtype), np.zeros(4, dtype), num_classes=3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(gt, np.zeros(3, dtype), num_classes=3)
