"""Label records of the grid pass: the fused labels they rebuild equal
:func:`~pipeline.ensembling.fusion.fuse_labels` bit for bit, and the rows scored from them
equal a pass of their own."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.ensembling import fusion
from pipeline.ensembling.gridscore import GridScorer, grid_counts
from pipeline.ensembling.passes import score_pass
from pipeline.ensembling.records import fused_rows, labels_at, load_records, save_records
from pipeline.evaluation.metrics import mean_iou

from test_gridscore import ALPHAS, BETAS, brute_force, random_maps
from test_passes import workspace


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
    scorer = GridScorer(ALPHAS, BETAS, c, record=True)
    frames, records = [], []
    for _ in range(3):
        maps = _tied_groups(rng, c, shape, empty)
        gt = rng.integers(0, c, size=shape).astype(np.uint8)
        gt[rng.random(shape) < 0.2] = 255  # void pixels keep a prediction (video consistency)
        frames.append((maps, gt))
        records.append(scorer.add(maps["S"], maps["W"], maps["A"], gt))
    assert any(r.multi for r in records)  # the fusion really depends on the weights
    save_records(tmp_path / "chunk.npz", records, new_video=[True, False, True])
    chunk, shapes, new_video = load_records(tmp_path / "chunk.npz")
    assert shapes.tolist() == [list(shape)] * 3 and new_video.tolist() == [True, False, True]
    size = shape[0] * shape[1]
    for a in ALPHAS:
        for b in BETAS:
            whole = labels_at(chunk, a, b)
            for i, ((maps, gt), record) in enumerate(zip(frames, records)):
                expected = fusion.fuse_labels(maps["S"], maps["W"], maps["A"], alpha=a, beta=b)
                got = labels_at(record, a, b)
                assert got.dtype == expected.dtype and got.shape == expected.shape
                np.testing.assert_array_equal(got, expected)
                np.testing.assert_array_equal(whole[i * size:(i + 1) * size], expected.ravel())
                np.testing.assert_array_equal(chunk.gt[i * size:(i + 1) * size], gt.ravel())
    # recording changes no count
    plain = GridScorer(ALPHAS, BETAS, c)
    for maps, gt in frames:
        assert plain.add(maps["S"], maps["W"], maps["A"], gt) is None
    np.testing.assert_array_equal(plain.counts.tp, scorer.counts.tp)
    np.testing.assert_array_equal(plain.counts.pred, scorer.counts.pred)
    tp, pred = brute_force(frames[0][0]["S"], frames[0][0]["W"], frames[0][0]["A"], frames[0][1],
                           ALPHAS, BETAS)
    counts = grid_counts(frames[0][0]["S"], frames[0][0]["W"], frames[0][0]["A"],
                         frames[0][1], alphas=ALPHAS, betas=BETAS)
    np.testing.assert_array_equal(counts.tp, tp)
    np.testing.assert_array_equal(counts.pred, pred)


def test_fused_rows_from_records_equal_a_pass_of_their_own(tmp_path):
    rng = np.random.default_rng(8)
    source, frames, _, masks = workspace(tmp_path, rng, videos=(9, 10, 3))
    for fid in list(masks)[::4]:  # void pixels: their predictions count in video consistency
        path = next(f.mask for f in frames if f.id == fid)
        masks[fid][:2, :3] = 255
        Image.fromarray(masks[fid], mode="L").save(path)
    groups = {"S": ["a_s0"], "W": ["b_s0"]}
    rows = {f"r{i}": fusion.FusedRow(a, 0.0) for i, a in enumerate(ALPHAS)}
    records = tmp_path / "records"
    records.mkdir()
    counts, _ = score_pass(source, frames, rows={}, groups=groups, grid=(ALPHAS, [0.0]),
                           record_dir=records, chunk_frames=4, progress=False)
    assert len(list(records.glob("chunk*.npz"))) == 3  # one per chunk of whole videos
    _, direct = score_pass(source, frames, rows=rows, groups=groups, chunk_frames=4,
                           progress=False)
    rebuilt = fused_rows(records, rows=rows, num_classes=4, progress=False)
    for i, key in enumerate(rows):
        np.testing.assert_array_equal(rebuilt[key][0], direct[key][0])
        np.testing.assert_equal(rebuilt[key][1], direct[key][1])  # mVC8, mVC16 (nan alike)
        assert mean_iou(rebuilt[key][0]) == counts.miou()[i, 0]
    with pytest.raises(ValueError, match="grid"):
        score_pass(source, frames, rows={}, groups=groups, record_dir=records,
                   progress=False)
