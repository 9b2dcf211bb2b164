"""Confusion matrix, IoU / accuracy and VSPW video consistency against hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.evaluation import metrics
from pipeline.evaluation.metrics import (ConfusionMatrix, VideoConsistency, class_accuracy, confusion_matrix,
                              format_table, iou_per_class, mean_iou, mvc, pixel_accuracy, summarize,
                              vc_window_scores)


def naive_cm(gt, pred, num_classes, ignore_index=255):
    """Pixel-by-pixel reference."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    for g, p in zip(np.ravel(gt).tolist(), np.ravel(pred).tolist()):
        if g != ignore_index:
            cm[g, p] += 1
    return cm


# ----------------------------------------------------------------------------- confusion matrix
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


# ----------------------------------------------------------------------------- video consistency
def _frames(rows):
    return [np.array([r], dtype=np.uint8) for r in rows]  # each frame is 1x4


# Video A, 4 frames: windows (n=2) start at 0 and 1; the window f2-f3 is the skipped last one
# (it would score 0: same gt, every prediction changes).
A_GT = _frames([[0, 0, 1, 1], [0, 0, 1, 2], [0, 1, 1, 2], [0, 1, 1, 2]])
A_PRED = _frames([[0, 0, 1, 1], [0, 1, 1, 2], [0, 1, 1, 2], [3, 3, 3, 3]])
# Video B, 2 frames <= n: contributes nothing (it would score 0).
B_GT = _frames([[0, 0, 0, 0], [0, 0, 0, 0]])
B_PRED = _frames([[0, 0, 0, 0], [1, 1, 1, 1]])
# Video C, 4 frames: window 0 has no constant gt pixel (|G| = 0 -> nan); window 1 has G = all,
# P = none -> 0; the skipped last window would score 1.
C_GT = _frames([[0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]])
C_PRED = _frames([[2, 2, 2, 2], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
VIDEOS = [(A_GT, A_PRED), (B_GT, B_PRED), (C_GT, C_PRED)]


def test_vc_hand_computed():
    # A window 0: G = gt f0 == f1 = [T, T, T, F] (3), P = [T, F, T, F], G & P = 2 -> 2/3
    # A window 1: G = [T, F, T, T] (3), P = all, G & P = 3 -> 1
    assert vc_window_scores(A_GT, A_PRED, 2) == pytest.approx([2 / 3, 1.0])
    assert vc_window_scores(B_GT, B_PRED, 2) == []
    c = vc_window_scores(C_GT, C_PRED, 2)
    assert len(c) == 2 and math.isnan(c[0]) and c[1] == 0.0
    # pooled: nanmean(2/3, 1, nan, 0) = (5/3) / 3 = 5/9, not the mean of video means (5/6 + 0) / 2
    assert mvc(VIDEOS, n=2) == pytest.approx(5 / 9)
    # n = 3: A has one window f0..f2: G = [T, F, T, F], P = [T, F, T, F] -> 1; C's is nan
    assert mvc(VIDEOS, n=3) == pytest.approx(1.0)
    assert math.isnan(mvc([(B_GT, B_PRED)], n=2))


def test_streaming_vc_hand_example():
    acc = VideoConsistency(windows=(2, 3))
    for gt, pred in VIDEOS:
        for g, p in zip(gt, pred):
            acc.add_frame(g, p)
        acc.end_video()
    assert acc.mvc(2) == pytest.approx(5 / 9)
    assert acc.result()[3] == pytest.approx(1.0)


def _random_video(rng, length, shape=(6, 7), labels=3, change=0.05):
    gt = [rng.integers(0, labels, size=shape, dtype=np.uint8)]
    pred = [np.where(rng.random(shape) < 0.1, 0, gt[0]).astype(np.uint8)]
    for _ in range(length - 1):
        flip = rng.random(shape) < change
        gt.append(np.where(flip, rng.integers(0, labels, size=shape), gt[-1]).astype(np.uint8))
        noise = rng.random(shape) < change
        pred.append(np.where(noise, rng.integers(0, labels, size=shape), gt[-1]).astype(np.uint8))
    return gt, pred


def test_streaming_vc_equals_batch():
    rng = np.random.default_rng(4)
    videos = [_random_video(rng, length) for length in (1, 2, 3, 8, 9, 16, 17, 25, 40)]
    windows = (1, 2, 3, 8, 16)
    acc = VideoConsistency(windows=windows)
    for gt, pred in videos:
        for g, p in zip(gt, pred):
            acc.add_frame(g, p)
        acc.end_video()
    for n in windows:
        batch = [s for gt, pred in videos for s in vc_window_scores(gt, pred, n)]
        assert len(batch) == sum(max(len(gt) - n, 0) for gt, _ in videos)
        np.testing.assert_allclose(acc.scores[n], batch, equal_nan=True)
        assert acc.mvc(n) == pytest.approx(mvc(videos, n=n), nan_ok=True)
    assert 0 < acc.mvc(8) < 1  # the example is neither trivial nor all-nan


def test_streaming_vc_merge_and_shape_check():
    a, b = VideoConsistency(windows=(2,)), VideoConsistency(windows=(2,))
    for g, p in zip(A_GT, A_PRED):
        a.add_frame(g, p)
    a.end_video()
    for g, p in zip(C_GT, C_PRED):
        b.add_frame(g, p)
    b.end_video()
    assert a.merge(b).mvc(2) == pytest.approx(5 / 9)
    with pytest.raises(ValueError, match="shape"):
        a.add_frame(np.zeros((2, 2)), np.zeros((2, 3)))


# ----------------------------------------------------------------------------- summary
def test_summary_is_json_and_table_in_percent():
    cm = np.array([[3, 1, 0], [0, 2, 1], [0, 0, 0]])
    summary = summarize(cm, class_names=["sky", "road", "cat"], vc={8: 0.5})
    parsed = json.loads(json.dumps(summary, allow_nan=False))
    # "cat" was predicted once but never in the gt: IoU 0 (its union is 1), counted in the mean;
    # its accuracy is undefined and left out of the mean accuracy (3/4 + 2/3) / 2
    assert parsed["mIoU"] == pytest.approx((3 / 4 + 2 / 4 + 0) / 3)
    assert parsed["miou_definition"] == metrics.MIOU_DEFINITION
    assert parsed["mean_class_accuracy"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert parsed["mVC8"] == 0.5 and parsed["mVC16"] is None
    assert parsed["per_class"]["cat"] == {"iou": 0.0, "accuracy": None, "gt_pixels": 0,
                                          "pred_pixels": 1}
    assert parsed["unpredicted_pixels"] == 0
    table = format_table(summary)
    assert "mIoU 41.67" in table and "75.00" in table and "mean acc 70.83" in table
    assert "mVC8 50.00" in table and table.count(metrics.MIOU_DEFINITION) == 1
    with pytest.raises(ValueError):
        summarize(cm, class_names=["a", "a", "b"])
