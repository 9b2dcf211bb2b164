"""infer.py with infer.oof_sample: maps of exactly the sampled OOF frames and every test frame,
coverage checked against the sample, metrics that say they are on it, a changed sample."""

from __future__ import annotations

import json

import pytest

from pipeline.core.errors import PipelineError
from pipeline.data.manifest import read_manifest
from pipeline.data.oof_sample import OOFSample, sample_clips, sampled_ids
from pipeline.data.splits import read_folds
from pipeline.infer import main as infer_main
from pipeline.inference.members import Member, check_coverage

SAMPLE = {"windows": 1, "length": 3, "every_nth_video": 2, "seed": 1}


def _infer_all(ws, root, sample: dict) -> list[dict]:
    params = ws.write_params(root / "params.yaml", infer={
        "tta": {"scales": [1.0], "flip": False}, "device": "cpu", "num_workers": 0,
        "out": str(root / "oof_preds"), "oof_sample": sample})
    return [infer_main([str(ws.train(fold=k).root), "--params", str(params), "--data",
                        str(ws.data), "--folds", str(ws.folds), "--no-progress"])
            for k in range(ws.n_folds)]


@pytest.fixture(scope="module")
def sampled(demo_workspace, tmp_path_factory):
    root = tmp_path_factory.mktemp("sampled")
    return root, _infer_all(demo_workspace, root, SAMPLE)


def test_maps_of_exactly_the_sampled_oof_frames_and_every_test_frame(sampled, demo_workspace):
    root, metrics = sampled
    train = read_manifest(demo_workspace.manifest, split="train")
    want = sampled_ids(train, OOFSample(**SAMPLE))
    videos = sorted({f.video for f in train})
    assert {f.video for f in train if f.id in want} == set(videos[1::2])
    assert len(want) == 3 * len(videos[1::2]) < len(train)
    member = Member(root / "oof_preds" / "tiny_s0")
    assert member.oof_ids() == sorted(want)
    folds = read_folds(demo_workspace.folds)
    assert all(member.oof_fold(i) == folds[i] for i in want)  # each by its own fold's run
    test_ids = sorted(f.id for f in read_manifest(demo_workspace.manifest, split="test"))
    assert all(member.test_ids(k) == test_ids for k in range(demo_workspace.n_folds))
    assert sum(m["oof_frames"] for m in metrics) == len(want)
    # the OOF mIoU is over the sample, and says so; meta.json records the sample
    assert all(m["oof_sampled"] and m["oof_sample"] == SAMPLE for m in metrics)
    assert all(member.meta[k]["oof_sample"] == SAMPLE for k in member.folds)


def test_coverage_accepts_exactly_the_sample_and_names_a_missing_sampled_frame(sampled,
                                                                               demo_workspace):
    root, _ = sampled
    member = Member(root / "oof_preds" / "tiny_s0")
    train = read_manifest(demo_workspace.manifest, split="train")
    want = sorted(sampled_ids(train, OOFSample(**SAMPLE)))
    assert check_coverage(member, want) == len(want)
    with pytest.raises(PipelineError, match=f"missing \\(first {sorted(set(read_folds(demo_workspace.folds)) - set(want))[0]}\\)"):
        check_coverage(member, read_folds(demo_workspace.folds))  # every frame: the rest missing
    with pytest.raises(PipelineError, match=f"1 unexpected \\(first {want[0]}\\)"):
        check_coverage(member, want[1:])


def test_a_changed_sample_removes_the_maps_it_no_longer_holds(demo_workspace, tmp_path):
    ws = demo_workspace
    _infer_all(ws, tmp_path, SAMPLE)
    other = {**SAMPLE, "seed": 0, "length": 2}
    metrics = _infer_all(ws, tmp_path, other)
    train = read_manifest(ws.manifest, split="train")
    member = Member(tmp_path / "oof_preds" / "tiny_s0")
    assert member.oof_ids() == sorted(sampled_ids(train, OOFSample(**other)))
    assert sum(m["oof_frames"] for m in metrics) == len(member.oof_ids())
    # back to every frame: nothing sampled, the metrics say so and meta.json has no sample
    full = _infer_all(ws, tmp_path, {})
    member = Member(tmp_path / "oof_preds" / "tiny_s0")
    assert member.oof_ids() == sorted(f.id for f in train)
    assert not any(m["oof_sampled"] for m in full) and "oof_sample" not in member.meta[0]
    assert json.loads((tmp_path / "oof_preds" / "tiny_s0" / "f0" / "meta.json").read_text())[
        "counts"]["oof"] == len([i for i, k in read_folds(ws.folds).items() if k == 0])
    assert len(sample_clips(train, OOFSample())) == len({f.video for f in train})
