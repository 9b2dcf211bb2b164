"""The oof_preds member layout: paths, run meta, members' OOF union and test mean, coverage,
and maps checked against their run's meta.json."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.core.names import member_name
from pipeline.inference import members
from pipeline.inference.mapfile import read_probs, write_probs
from pipeline.inference.members import (Member, check_coverage, list_members, map_path, run_map_dir,
                                        write_run_meta)

from test_mapfile import U8_BOUND, softmax_map


def make_run(root, member, fold, *, oof=(), test=(), classes=3, value=None, counts=True,
             stride=1):
    """Write a run's maps (``value``: a fixed class-0 probability, else random) and meta.json."""
    run = run_map_dir(root, member, fold)
    rng = np.random.default_rng(zlib.crc32(f"{member}/{fold}".encode()))
    for kind, ids in (("oof", oof), ("test", test)):
        for frame_id in ids:
            if value is None:
                probs = softmax_map(rng, classes, 4, 5)
            else:
                probs = np.full((classes, 4, 5), (1 - value) / (classes - 1), np.float32)
                probs[0] = value
            write_probs(map_path(run / kind, frame_id), probs, stride=stride,
                        meta={"member": member, "frame": frame_id})
    meta = {"member": member, "fold": fold, "seed": 0, "classes": classes, "quant": "uint8",
            "stride": stride, "checkpoint": "x.pt", "tta": {}}
    if counts:
        meta["counts"] = {"oof": len(oof), "test": len(test)}
    write_run_meta(run, meta)
    return run


def test_names_and_paths(tmp_path):
    assert member_name("unet_r18", 2) == "unet_r18_s2"
    assert run_map_dir(tmp_path, "m_s0", 3) == tmp_path / "m_s0" / "f3"
    assert run_map_dir(tmp_path, "m_s0", "all") == tmp_path / "m_s0" / "fall"
    assert map_path(tmp_path, "vid_0001") == tmp_path / "vid_0001.npz"
    for bad in ("../x", "a/b", ".hidden", ""):
        with pytest.raises(PipelineError):
            map_path(tmp_path, bad)
    with pytest.raises(PipelineError):
        run_map_dir(tmp_path, "m_s0", -1)
    with pytest.raises(PipelineError, match="missing keys"):
        write_run_meta(tmp_path, {"member": "m_s0"})


def test_member_oof_union_and_test_mean(tmp_path):
    root = tmp_path / "oof_preds"
    make_run(root, "m_s0", 0, oof=["b", "a"], test=["t1", "t2"], value=0.2)
    make_run(root, "m_s0", 1, oof=["c"], test=["t1"], value=0.6)
    make_run(root, "m_s0", "all", test=["t1", "t2"], value=1.0)
    # noise DVC or a crash leaves behind: none of it is a run or a map
    (root / "m_s0" / ".gitignore").write_text("/f0\n")
    (root / "m_s0" / "f2").mkdir()  # an unfinished run: no meta.json
    (root / "m_s0" / "notes.txt").write_text("x")
    (root / "m_s0" / "f0" / "oof" / ".a.npz.123.tmp").write_bytes(b"partial")
    member = Member(root / "m_s0")
    assert member.name == "m_s0" and member.folds == [0, 1, "all"]
    assert (member.classes, member.quant, member.stride) == (3, "uint8", 1)
    assert member.meta[1]["fold"] == 1
    assert member.oof_ids() == ["a", "b", "c"]
    assert member.oof_fold("c") == 1
    assert np.allclose(member.read_oof("c")[0], 0.6, atol=U8_BOUND)
    assert member.test_ids() == ["t1", "t2"]
    # hand-computed: class 0 is 0.2, 0.6 and 1.0 in the three runs
    assert np.allclose(member.read_test("t1")[0], (0.2 + 0.6 + 1.0) / 3, atol=U8_BOUND)
    assert np.allclose(member.read_test("t2")[0], (0.2 + 1.0) / 2, atol=U8_BOUND)
    assert np.allclose(member.read_test("t1", folds=[0, 1])[0], 0.4, atol=U8_BOUND)
    assert np.allclose(member.read_test("t1", folds=[0, 1])[1], 0.3, atol=U8_BOUND)
    with pytest.raises(PipelineError, match="t2"):
        member.read_test("t2", folds=[1])
    with pytest.raises(PipelineError, match="zz"):
        member.read_oof("zz")


def test_member_test_mean_full_size(tmp_path):
    root = tmp_path / "oof_preds"
    make_run(root, "m_s0", 0, test=["t"], value=0.2, stride=2)
    make_run(root, "m_s0", 1, test=["t"], value=0.6, stride=2)
    member = Member(root / "m_s0")
    assert member.read_test("t").shape == (3, 2, 3)
    full = member.read_test("t", full_size=True)
    assert full.shape == (3, 4, 5) and np.allclose(full[0], 0.4, atol=U8_BOUND)


def test_member_duplicate_oof_frame(tmp_path):
    root = tmp_path / "oof_preds"
    make_run(root, "m_s0", 0, oof=["a", "b"])
    make_run(root, "m_s0", 1, oof=["b"])
    with pytest.raises(PipelineError, match="frame b .*f0 and f1"):
        Member(root / "m_s0").oof_ids()


def test_member_folds_must_agree(tmp_path):
    root = tmp_path / "oof_preds"
    make_run(root, "m_s0", 0, oof=["a"], classes=3)
    make_run(root, "m_s0", 1, oof=["b"], classes=4)
    with pytest.raises(PipelineError, match="classes: f0=3, f1=4"):
        Member(root / "m_s0")


def test_member_counts_checked(tmp_path):
    root = tmp_path / "oof_preds"
    run = make_run(root, "m_s0", 0, oof=["a", "b"])
    map_path(run / "oof", "b").unlink()
    with pytest.raises(PipelineError, match="holds 1 maps but meta.json counts 2"):
        Member(root / "m_s0").oof_ids()


def test_member_fold_folder_mismatch(tmp_path):
    run = make_run(tmp_path, "m_s0", 0, oof=["a"])
    run.rename(tmp_path / "m_s0" / "f1")
    with pytest.raises(PipelineError, match="does not match its folder f1"):
        Member(tmp_path / "m_s0")


def test_list_members_skips_non_members(tmp_path):
    root = tmp_path / "oof_preds"
    make_run(root, "b_s0", 0, oof=["a"])
    make_run(root, "a_s1", 0, oof=["a"])
    (root / ".gitignore").write_text("/a_s1\n/b_s0\n")
    (root / "README.txt").write_text("x")
    (root / "empty_s0" / "f0").mkdir(parents=True)  # no meta.json: not (yet) a member
    assert [m.name for m in list_members(root)] == ["a_s1", "b_s0"]
    with pytest.raises(PipelineError, match="not found"):
        list_members(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="no members"):
        list_members(tmp_path / "empty")


def test_check_coverage(tmp_path):
    root = tmp_path / "oof_preds"
    make_run(root, "m_s0", 0, oof=["a", "b"])
    make_run(root, "m_s0", 1, oof=["c"])
    member = Member(root / "m_s0")
    assert check_coverage(member, ["c", "b", "a"]) == 3
    with pytest.raises(PipelineError, match=r"1 missing \(first d\)"):
        check_coverage(member, ["a", "b", "c", "d"])
    with pytest.raises(PipelineError, match=r"1 unexpected \(first c\)"):
        check_coverage(member, ["a", "b"])
    make_run(root, "m_s1", 0, oof=["a", "b"])
    make_run(root, "m_s1", 1, oof=["b", "c"])
    with pytest.raises(PipelineError, match="frame b"):
        check_coverage(Member(root / "m_s1"), ["a", "b", "c"])


def test_member_maps_must_be_stored_as_their_run_says(tmp_path):
    root = tmp_path / "oof_preds"
    run = make_run(root, "m_s0", 0, oof=["a"], test=["t"])
    member = Member(root / "m_s0")
    assert member.expect == {"classes": 3, "quant": "uint8", "stride": 1, "topk": 0}
    write_probs(map_path(run / "test", "t"), softmax_map(np.random.default_rng(3), 3, 4, 5),
                quant="float16")  # another dtype than meta.json's uint8
    with pytest.raises(PipelineError, match=r"t\.npz: stored with quant float16 \(its run's "
                                            r"meta.json: uint8\)"):
        member.read_test("t")
    write_probs(map_path(run / "oof", "a"), softmax_map(np.random.default_rng(3), 3, 4, 5),
                stride=2)
    with pytest.raises(PipelineError, match=r"a\.npz: stored with stride 2"):
        member.read_oof("a")
    assert read_probs(map_path(run / "oof", "a")).shape == (3, 2, 3)  # alone, it is a fine map


def test_member_names_and_a_chosen_list_of_members(tmp_path):
    root = tmp_path / "oof_preds"
    make_run(root, "b_s0", 0, oof=["a"])
    make_run(root, "a_s1", 0, oof=["a"], test=["t"])
    make_run(root, "a_s1", "all", test=["t", "u"])
    (root / "broken_s0" / "f0").mkdir(parents=True)
    (root / "broken_s0" / "f0" / "meta.json").write_text("not json")  # never read unless wanted
    assert members.member_names(root) == ["a_s1", "b_s0", "broken_s0"]
    assert [m.name for m in list_members(root, ["b_s0"])] == ["b_s0"]
    with pytest.raises(PipelineError, match=r"c_s0: no maps of member 'c_s0'.*c_s0, d_s9"):
        list_members(root, ["d_s9", "c_s0", "b_s0"])
    with pytest.raises(PipelineError, match="unreadable run meta"):
        list_members(root)
    member = Member(root / "a_s1")
    assert member.test_ids(0) == ["t"] and member.test_ids("all") == ["t", "u"]
    assert member.test_ids(3) == [] and member.test_ids() == ["t", "u"]
