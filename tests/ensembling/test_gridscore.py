"""The single-pass grid scores: exact agreement with a per-grid-point brute force (ties, one-ulp
leads, void pixels, empty groups), and mIoU from counts equal to that of a confusion matrix."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.ensembling import fusion
from pipeline.ensembling.gridscore import grid_counts, miou_from_counts
from pipeline.evaluation.metrics import confusion_matrix, mean_iou

ALPHAS = [0.0, 0.3, 0.5, 1.0, 1.7]
BETAS = [0.0, 0.25, 1.0, 2.0]


def random_maps(rng, classes, shape, levels=None):
    """Softmax-like maps float32 [C, H, W]; ``levels`` quantizes them (many exact ties)."""
    logits = rng.normal(size=(classes, *shape)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=0)
    if levels:
        probs = np.round(probs * levels) / levels
    return probs.astype(np.float32)


def brute_force(ps, pw, pa, gt, alphas, betas):
    """tp and pred counts [A, B, C] by fusing and scoring each grid point on its own."""
    c = ps.shape[0]
    tp = np.zeros((len(alphas), len(betas), c), np.int64)
    pred = np.zeros_like(tp)
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            fused = ps.copy()
            if pw is not None:
                fused = fused + np.float32(a) * pw
            if pa is not None:
                fused = fused + np.float32(b) * pa
            cm = confusion_matrix(gt, fused.argmax(0).astype(np.uint8), num_classes=c)
            tp[i, j], pred[i, j] = np.diag(cm), cm.sum(axis=0)
    return tp, pred


@pytest.mark.parametrize("levels", [None, 255, 6])
@pytest.mark.parametrize("empty", [None, "W", "A"])
def test_grid_counts_equal_brute_force_at_every_point(levels, empty):
    rng = np.random.default_rng(7 if levels is None else levels)
    c, shape = 5, (24, 31)
    base = random_maps(rng, c, shape, levels)
    # groups that mostly agree with one another (like real members) but not everywhere
    maps = {g: np.where(rng.random(shape) < 0.7, base, random_maps(rng, c, shape, levels))
            for g in fusion.GROUPS}
    if empty:
        maps[empty] = None
    gt = rng.integers(0, c, size=shape).astype(np.uint8)
    gt[rng.random(shape) < 0.1] = 255
    counts = grid_counts(maps["S"], maps["W"], maps["A"], gt, alphas=ALPHAS, betas=BETAS)
    tp, pred = brute_force(maps["S"], maps["W"], maps["A"], gt, ALPHAS, BETAS)
    np.testing.assert_array_equal(counts.tp, tp)
    np.testing.assert_array_equal(counts.pred, pred)
    np.testing.assert_array_equal(counts.gt, np.bincount(gt[gt != 255], minlength=c))
    for i in range(len(ALPHAS)):  # and fuse_labels is the same fusion
        label = fusion.fuse_labels(maps["S"], maps["W"], maps["A"], alpha=ALPHAS[i], beta=BETAS[-1])
        cm = confusion_matrix(gt, label, num_classes=c)
        assert counts.miou()[i, -1] == mean_iou(cm)


def test_grid_counts_with_exact_ties_between_classes():
    # P_S ties classes 1 and 2; W and A break the tie in opposite directions: which wins
    # depends on the grid point, and an exact tie must go to the lower class as in np.argmax
    ps = np.array([[0.1], [0.45], [0.45]], np.float32)[:, :, None].repeat(4, 2)
    pw = np.array([[0.0], [0.5], [0.25]], np.float32)[:, :, None].repeat(4, 2)
    pa = np.array([[0.0], [0.25], [0.5]], np.float32)[:, :, None].repeat(4, 2)
    gt = np.array([[0, 1, 2, 255]], np.uint8)
    grid = [0.0, 0.5, 1.0, 2.0]
    counts = grid_counts(ps, pw, pa, gt, alphas=grid, betas=grid)
    tp, pred = brute_force(ps, pw, pa, gt, grid, grid)
    np.testing.assert_array_equal(counts.pred, pred)
    np.testing.assert_array_equal(counts.tp, tp)
    assert counts.pred[0, 0].tolist() == [0, 3, 0]   # alpha = beta = 0: tie -> class 1
    assert counts.pred[1, 1].tolist() == [0, 3, 0]   # equal weights: still tied
    assert counts.pred[0, 1].tolist() == [0, 0, 3]   # A decides


def test_grid_counts_when_rounding_ties_a_lead_of_one_ulp():
    # S leads class 0 by one float32 ulp in class 1; W adds the same to both, and at
    # alpha = 0.3 the sum rounds both to one float: fuse_labels then says 0, not 1
    lead = np.nextafter(np.float32(0.2), np.float32(1))
    ps = np.array([0.2, lead, 0.0], np.float32)[:, None, None]
    pw = np.array([0.5, 0.5, 0.0], np.float32)[:, None, None]
    gt = np.ones((1, 1), np.uint8)
    grid = [0.0, 0.3, 0.5, 1.0]
    assert fusion.fuse_labels(ps, pw, None, alpha=0.3, beta=0.0)[0, 0] == 0
    counts = grid_counts(ps, pw, None, gt, alphas=grid, betas=[0.0])
    tp, pred = brute_force(ps, pw, None, gt, grid, [0.0])
    np.testing.assert_array_equal(counts.pred, pred)
    np.testing.assert_array_equal(counts.tp, tp)


def test_agreeing_groups_give_the_same_counts_everywhere():
    rng = np.random.default_rng(1)
    ps = random_maps(rng, 4, (16, 16))
    gt = rng.integers(0, 4, size=(16, 16)).astype(np.uint8)
    counts = grid_counts(ps, ps * 0.5, ps * 0.25, gt, alphas=ALPHAS, betas=BETAS)
    assert (counts.pred == counts.pred[0, 0]).all() and (counts.tp == counts.tp[0, 0]).all()
    cm = confusion_matrix(gt, ps.argmax(0).astype(np.uint8), num_classes=4)
    np.testing.assert_array_equal(counts.tp[0, 0], np.diag(cm))


def test_grid_counts_reject_negative_weights():
    ps = np.full((2, 3, 3), 0.5, np.float32)
    with pytest.raises(ValueError, match=">= 0"):
        grid_counts(ps, ps, None, np.zeros((3, 3), np.uint8), alphas=[-1.0, 0.0], betas=[0.0])


def test_miou_from_counts_matches_metrics_exactly():
    rng = np.random.default_rng(3)
    for _ in range(20):
        cm = rng.integers(0, 50, size=(6, 6))
        cm[rng.integers(0, 6)] = 0  # a class absent from the ground truth (still predicted)
        got = miou_from_counts(np.diag(cm)[None], cm.sum(axis=0)[None], cm.sum(axis=1))
        assert got.shape == (1,) and got[0] == mean_iou(cm)
    # only predicted, never in the gt: IoU 0 and counted; neither: no union, left out
    assert miou_from_counts(np.zeros((2, 3)), np.ones((2, 3)), np.zeros(3)).tolist() == [0.0, 0.0]
    assert np.isnan(miou_from_counts(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros(3))).all()


def test_miou_from_counts_equals_mean_iou_at_every_grid_point():
    """A grid of confusion matrices where classes absent from the gt are predicted at some
    points and not at others (the set of classes averaged changes over the grid)."""
    rng = np.random.default_rng(11)
    c, a, b = 7, 4, 5
    gt = rng.integers(0, 60, size=c)
    gt[[1, 4]] = 0  # classes 1 and 4 are never in the ground truth
    cms = np.zeros((a, b, c, c), np.int64)
    for i in range(a):
        for j in range(b):
            for g in range(c):  # the same gt pixels, other predictions at each grid point
                cms[i, j, g] = np.bincount(rng.integers(0, c, gt[g]), minlength=c)
            if (i + j) % 3 == 0:  # here nothing is predicted as class 4
                cms[i, j, :, 0] += cms[i, j, :, 4]
                cms[i, j, :, 4] = 0
    tp = np.einsum("abcc->abc", cms)
    got = miou_from_counts(tp, cms.sum(axis=2), gt)
    assert got.shape == (a, b)
    for i in range(a):
        for j in range(b):
            assert got[i, j] == mean_iou(cms[i, j])  # the very same float
    assert any((cms[i, j, :, 4].sum() == 0) for i in range(a) for j in range(b))
    assert any((cms[i, j, :, 4].sum() > 0) for i in range(a) for j in range(b))
