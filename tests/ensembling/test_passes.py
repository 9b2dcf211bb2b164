"""The streaming passes over OOF maps: grid counts and table rows equal to a direct computation,
whatever the chunking; errors name the member and the frame; chunks keep videos whole."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.core.errors import PipelineError
from pipeline.data.manifest import Frame
from pipeline.ensembling import fusion
from pipeline.ensembling.gridscore import GridCounts, grid_counts
from pipeline.ensembling.passes import OofSource, frame_chunks, score_pass, video_chunks
from pipeline.evaluation.consistency import mvc
from pipeline.evaluation.metrics import confusion_matrix, mean_iou
from pipeline.inference.mapfile import write_probs
from pipeline.inference.members import list_members, run_map_dir, write_run_meta

from test_gridscore import ALPHAS, random_maps


def workspace(tmp_path, rng, *, videos=(9, 10), classes=4, shape=(6, 7)):
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
    source = OofSource(members=members, lut=np.r_[np.arange(classes), [255] * (256 - classes)],
                       num_classes=classes)
    read = {m.name: {f.id: m.read_oof(f.id) for f in frames} for m in members}
    return source, frames, read, masks


def test_pass_matches_direct_computation(tmp_path):
    rng = np.random.default_rng(5)
    source, frames, maps, masks = workspace(tmp_path, rng)
    groups = {"S": ["a_s0"], "W": ["b_s0"]}
    rows = {"one": fusion.MeanRow(("a_s0",)), "mean": fusion.MeanRow(("a_s0", "b_s0")),
            "fused": fusion.FusedRow(1.0, 0.0)}
    counts, table = score_pass(source, frames, rows=rows, groups=groups,
                               grid=(ALPHAS, [0.0]), chunk_frames=4, progress=False)
    total = GridCounts.zeros(ALPHAS, [0.0], 4)
    for f in frames:
        total.add(grid_counts(maps["a_s0"][f.id], maps["b_s0"][f.id], None, masks[f.id],
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
    none, again = score_pass(source, frames, rows=rows, groups=groups, chunk_frames=100,
                             progress=False)
    assert none is None
    for key in rows:
        np.testing.assert_array_equal(again[key][0], table[key][0])
        assert again[key][1] == pytest.approx(table[key][1], nan_ok=True)


def test_pass_errors_name_member_and_frame(tmp_path):
    rng = np.random.default_rng(6)
    source, frames, _, _ = workspace(tmp_path, rng, videos=(3,))
    write_probs(run_map_dir(tmp_path / "oof", "b_s0", 0) / "oof" / "v0_01.npz",
                random_maps(rng, 4, (6, 5)), quant="float16")
    with pytest.raises(PipelineError, match=r"b_s0: out-of-fold map of frame 'v0_01' is \[4, 6, 5\]"):
        score_pass(source, frames, rows={"x": fusion.MeanRow(("a_s0", "b_s0"))},
                   progress=False)


def test_video_chunks_keep_videos_whole():
    frames = [Frame(id=f"{v}{i}", image="", mask=None, video=v, frame=i, split="train")
              for v, n in (("a", 5), ("b", 2), ("c", 7), ("d", 1)) for i in range(n)]
    chunks = video_chunks(frames, 4)
    assert [[f.id for f in c] for c in chunks] == [
        ["a0", "a1", "a2", "a3", "a4"], ["b0", "b1", "c0", "c1", "c2", "c3", "c4", "c5", "c6"],
        ["d0"]]
    assert [len(c) for c in frame_chunks(frames, 4)] == [4, 4, 4, 3]
