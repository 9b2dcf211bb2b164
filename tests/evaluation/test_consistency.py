"""VSPW video consistency: hand-computed windows, and the streaming form equal to the batch one."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluation.consistency import VideoConsistency, mvc, vc_window_scores


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
