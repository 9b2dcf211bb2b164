"""Fusion maths and the single-pass grid scores: exact agreement with a per-grid-point brute
force (ties, void pixels, empty groups), mIoU from counts, and the streaming passes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.ensembling import fusion
from pipeline.data.manifest import Frame
from pipeline.core.errors import PipelineError
from pipeline.evaluation.metrics import confusion_matrix, mean_iou, mvc
from pipeline.inference.probstore import list_members, run_map_dir, write_probs, write_run_meta

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
    counts = fusion.grid_counts(maps["S"], maps["W"], maps["A"], gt, alphas=ALPHAS, betas=BETAS)
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
    counts = fusion.grid_counts(ps, pw, pa, gt, alphas=grid, betas=grid)
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
    counts = fusion.grid_counts(ps, pw, None, gt, alphas=grid, betas=[0.0])
    tp, pred = brute_force(ps, pw, None, gt, grid, [0.0])
    np.testing.assert_array_equal(counts.pred, pred)
    np.testing.assert_array_equal(counts.tp, tp)


def _tied_groups(rng, c, shape, empty=None):
    """Group maps with exact ties (few levels), one-ulp near ties and mostly agreeing
    groups; ``empty``: that group is None."""
    base = random_maps(rng, c, shape, levels=6)
    maps = {}
    for g in fusion.GROUPS:
        m = np.where(rng.random(shape) < 0.6, base, random_maps(rng, c, shape, levels=6))
        nudge = rng.random(m.shape) < 0.15
        m[nudge] = np.nextafter(m[nudge], np.float32(1))
        maps[g] = m.astype(np.float32)
    if empty:
        maps[empty] = None
    return maps


@pytest.mark.parametrize("empty", [None, "W", "A"])
def test_recorded_labels_equal_fuse_labels_bit_for_bit(empty, tmp_path):
    rng = np.random.default_rng(11)
    c, shape = 5, (20, 23)
    scorer = fusion.GridScorer(ALPHAS, BETAS, c, record=True)
    frames, records = [], []
    for _ in range(3):
        maps = _tied_groups(rng, c, shape, empty)
        gt = rng.integers(0, c, size=shape).astype(np.uint8)
        gt[rng.random(shape) < 0.2] = 255  # void pixels keep a prediction (video consistency)
        frames.append((maps, gt))
        records.append(scorer.add(maps["S"], maps["W"], maps["A"], gt))
    assert any(r.multi for r in records)  # the fusion really depends on the weights
    fusion.save_records(tmp_path / "chunk.npz", records, new_video=[True, False, True])
    chunk, shapes, new_video = fusion.load_records(tmp_path / "chunk.npz")
    assert shapes.tolist() == [list(shape)] * 3 and new_video.tolist() == [True, False, True]
    size = shape[0] * shape[1]
    for a in ALPHAS:
        for b in BETAS:
            whole = fusion.labels_at(chunk, a, b)
            for i, ((maps, gt), record) in enumerate(zip(frames, records)):
                expected = fusion.fuse_labels(maps["S"], maps["W"], maps["A"], alpha=a, beta=b)
                got = fusion.labels_at(record, a, b)
                assert got.dtype == expected.dtype and got.shape == expected.shape
                np.testing.assert_array_equal(got, expected)
                np.testing.assert_array_equal(whole[i * size:(i + 1) * size], expected.ravel())
                np.testing.assert_array_equal(chunk.gt[i * size:(i + 1) * size], gt.ravel())
    # recording changes no count
    plain = fusion.GridScorer(ALPHAS, BETAS, c)
    for maps, gt in frames:
        assert plain.add(maps["S"], maps["W"], maps["A"], gt) is None
    np.testing.assert_array_equal(plain.counts.tp, scorer.counts.tp)
    np.testing.assert_array_equal(plain.counts.pred, scorer.counts.pred)
    tp, pred = brute_force(frames[0][0]["S"], frames[0][0]["W"], frames[0][0]["A"], frames[0][1],
                           ALPHAS, BETAS)
    counts = fusion.grid_counts(frames[0][0]["S"], frames[0][0]["W"], frames[0][0]["A"],
                                frames[0][1], alphas=ALPHAS, betas=BETAS)
    np.testing.assert_array_equal(counts.tp, tp)
    np.testing.assert_array_equal(counts.pred, pred)


def test_agreeing_groups_give_the_same_counts_everywhere():
    rng = np.random.default_rng(1)
    ps = random_maps(rng, 4, (16, 16))
    gt = rng.integers(0, 4, size=(16, 16)).astype(np.uint8)
    counts = fusion.grid_counts(ps, ps * 0.5, ps * 0.25, gt, alphas=ALPHAS, betas=BETAS)
    assert (counts.pred == counts.pred[0, 0]).all() and (counts.tp == counts.tp[0, 0]).all()
    cm = confusion_matrix(gt, ps.argmax(0).astype(np.uint8), num_classes=4)
    np.testing.assert_array_equal(counts.tp[0, 0], np.diag(cm))


def test_grid_counts_reject_negative_weights():
    ps = np.full((2, 3, 3), 0.5, np.float32)
    with pytest.raises(ValueError, match=">= 0"):
        fusion.grid_counts(ps, ps, None, np.zeros((3, 3), np.uint8), alphas=[-1.0, 0.0], betas=[0.0])


def test_miou_from_counts_matches_metrics_exactly():
    rng = np.random.default_rng(3)
    for _ in range(20):
        cm = rng.integers(0, 50, size=(6, 6))
        cm[rng.integers(0, 6)] = 0  # a class absent from the ground truth (still predicted)
        got = fusion.miou_from_counts(np.diag(cm)[None], cm.sum(axis=0)[None], cm.sum(axis=1))
        assert got.shape == (1,) and got[0] == mean_iou(cm)
    # only predicted, never in the gt: IoU 0 and counted; neither: no union, left out
    assert fusion.miou_from_counts(np.zeros((2, 3)), np.ones((2, 3)), np.zeros(3)).tolist() == [0.0, 0.0]
    assert np.isnan(fusion.miou_from_counts(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros(3))).all()


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
    got = fusion.miou_from_counts(tp, cms.sum(axis=2), gt)
    assert got.shape == (a, b)
    for i in range(a):
        for j in range(b):
            assert got[i, j] == mean_iou(cms[i, j])  # the very same float
    assert any((cms[i, j, :, 4].sum() == 0) for i in range(a) for j in range(b))
    assert any((cms[i, j, :, 4].sum() > 0) for i in range(a) for j in range(b))


def test_group_mean_and_fuse():
    a, b = np.full((2, 1, 1), 0.2, np.float32), np.full((2, 1, 1), 0.6, np.float32)
    assert fusion.group_mean([]) is None
    np.testing.assert_allclose(fusion.group_mean([a, b]), 0.4)
    assert fusion.group_mean([a]) is not a  # a copy, never the member's own array
    np.testing.assert_allclose(fusion.fuse(a, None, b, alpha=5.0, beta=0.5), 0.5)
    np.testing.assert_allclose(fusion.fuse(a, b, None, alpha=0.5, beta=5.0), 0.5)


# ----------------------------------------------------------------------------- passes
def _workspace(tmp_path, rng, *, videos=(9, 10), classes=4, shape=(6, 7)):
    """Two members over 2 folds (video v out-of-fold in fold v % 2) with random maps and
    masks; returns (OofSource, frames sorted by video, {member: {id: map}}, {id: mask})."""
    frames, masks, maps = [], {}, {"a_s0": {}, "b_s0": {}}
    for v, n in enumerate(videos):
        for i in range(n):
            fid = f"v{v}_{i:02d}"
            masks[fid] = rng.integers(0, classes, size=shape).astype(np.uint8)
            if i % 3:  # slowly changing masks, so video consistency is not trivial
                masks[fid] = masks[f"v{v}_{i - 1:02d}"].copy()
                masks[fid][0, i % shape[1]] = (masks[fid][0, i % shape[1]] + 1) % classes
            path = tmp_path / "masks" / f"{fid}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(masks[fid], mode="L").save(path)
            frames.append(Frame(id=fid, image="", mask=str(path), video=f"v{v}", frame=i,
                                split="train"))
            for name in maps:
                maps[name][fid] = random_maps(rng, classes, shape)
                run = run_map_dir(tmp_path / "oof", name, v % 2)
                write_probs(run / "oof" / f"{fid}.npz", maps[name][fid], quant="float16")
    for name in maps:
        for fold in (0, 1):
            write_run_meta(run_map_dir(tmp_path / "oof", name, fold),
                           {"member": name, "fold": fold, "classes": classes,
                            "quant": "float16", "stride": 1})
    members = tuple(list_members(tmp_path / "oof"))
    source = fusion.OofSource(members=members, lut=np.r_[np.arange(classes), [255] * (256 - classes)],
                              num_classes=classes)
    read = {m.name: {f.id: m.read_oof(f.id) for f in frames} for m in members}
    return source, frames, read, masks


def test_pass_matches_direct_computation(tmp_path):
    rng = np.random.default_rng(5)
    source, frames, maps, masks = _workspace(tmp_path, rng)
    groups = {"S": ["a_s0"], "W": ["b_s0"]}
    rows = {"one": fusion.MeanRow(("a_s0",)), "mean": fusion.MeanRow(("a_s0", "b_s0")),
            "fused": fusion.FusedRow(1.0, 0.0)}
    counts, table = fusion.score_pass(source, frames, rows=rows, groups=groups,
                                      grid=(ALPHAS, [0.0]), chunk_frames=4, progress=False)
    total = fusion.GridCounts.zeros(ALPHAS, [0.0], 4)
    for f in frames:
        total.add(fusion.grid_counts(maps["a_s0"][f.id], maps["b_s0"][f.id], None, masks[f.id],
                                     alphas=ALPHAS, betas=[0.0]))
    np.testing.assert_array_equal(counts.tp, total.tp)
    np.testing.assert_array_equal(counts.pred, total.pred)
    np.testing.assert_array_equal(counts.gt, total.gt)
    predictions = {
        "one": lambda i: maps["a_s0"][i].argmax(0),
        "mean": lambda i: fusion.group_mean([maps["a_s0"][i], maps["b_s0"][i]]).argmax(0),
        "fused": lambda i: fusion.fuse_labels(maps["a_s0"][i], maps["b_s0"][i], None, alpha=1.0,
                                              beta=0.0)}
    for key, pred_of in predictions.items():
        videos = [([masks[f.id] for f in frames if f.video == v],
                   [pred_of(f.id) for f in frames if f.video == v]) for v in ("v0", "v1")]
        cm = sum(confusion_matrix(g, p.astype(np.uint8), num_classes=4)
                 for gts, preds in videos for g, p in zip(gts, preds))
        np.testing.assert_array_equal(table[key][0], cm)
        assert table[key][1][8] == pytest.approx(mvc(videos, n=8))
        assert np.isnan(table[key][1][16])  # no video is longer than 16 frames
    assert counts.miou()[3, 0] == mean_iou(table["fused"][0])  # alpha = 1.0
    # rows alone (no grid): the same results, and the chunking does not matter
    none, again = fusion.score_pass(source, frames, rows=rows, groups=groups, chunk_frames=100,
                                    progress=False)
    assert none is None
    for key in rows:
        np.testing.assert_array_equal(again[key][0], table[key][0])
        assert again[key][1] == pytest.approx(table[key][1], nan_ok=True)


def test_fused_rows_from_records_equal_a_pass_of_their_own(tmp_path):
    rng = np.random.default_rng(8)
    source, frames, _, masks = _workspace(tmp_path, rng, videos=(9, 10, 3))
    for fid in list(masks)[::4]:  # void pixels: their predictions count in video consistency
        path = next(f.mask for f in frames if f.id == fid)
        masks[fid][:2, :3] = 255
        Image.fromarray(masks[fid], mode="L").save(path)
    groups = {"S": ["a_s0"], "W": ["b_s0"]}
    rows = {f"r{i}": fusion.FusedRow(a, 0.0) for i, a in enumerate(ALPHAS)}
    records = tmp_path / "records"
    records.mkdir()
    counts, _ = fusion.score_pass(source, frames, rows={}, groups=groups, grid=(ALPHAS, [0.0]),
                                  record_dir=records, chunk_frames=4, progress=False)
    assert len(list(records.glob("chunk*.npz"))) == 3  # one per chunk of whole videos
    _, direct = fusion.score_pass(source, frames, rows=rows, groups=groups, chunk_frames=4,
                                  progress=False)
    rebuilt = fusion.fused_rows(records, rows=rows, num_classes=4, progress=False)
    for i, key in enumerate(rows):
        np.testing.assert_array_equal(rebuilt[key][0], direct[key][0])
        np.testing.assert_equal(rebuilt[key][1], direct[key][1])  # mVC8, mVC16 (nan alike)
        assert mean_iou(rebuilt[key][0]) == counts.miou()[i, 0]
    with pytest.raises(ValueError, match="grid"):
        fusion.score_pass(source, frames, rows={}, groups=groups, record_dir=records,
                          progress=False)


def test_pass_errors_name_member_and_frame(tmp_path):
    rng = np.random.default_rng(6)
    source, frames, _, _ = _workspace(tmp_path, rng, videos=(3,))
    write_probs(run_map_dir(tmp_path / "oof", "b_s0", 0) / "oof" / "v0_01.npz",
                random_maps(rng, 4, (6, 5)), quant="float16")
    with pytest.raises(PipelineError, match=r"b_s0: out-of-fold map of frame 'v0_01' is \[4, 6, 5\]"):
        fusion.score_pass(source, frames, rows={"x": fusion.MeanRow(("a_s0", "b_s0"))},
                          progress=False)


def test_video_chunks_keep_videos_whole():
    frames = [Frame(id=f"{v}{i}", image="", mask=None, video=v, frame=i, split="train")
              for v, n in (("a", 5), ("b", 2), ("c", 7), ("d", 1)) for i in range(n)]
    chunks = fusion.video_chunks(frames, 4)
    assert [[f.id for f in c] for c in chunks] == [
        ["a0", "a1", "a2", "a3", "a4"], ["b0", "b1", "c0", "c1", "c2", "c3", "c4", "c5", "c6"],
        ["d0"]]
    assert [len(c) for c in fusion.frame_chunks(frames, 4)] == [4, 4, 4, 3]
