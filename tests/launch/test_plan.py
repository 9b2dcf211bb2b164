"""The cost plan (pipeline/launch/plan.py, `parallel.py --plan`) and the disk check of a run.

A small workspace whose numbers are worked out by hand in the comments: 8 train frames of two
sizes in 3 folds, 2 test frames, 5 classes; two models x 3 folds x 2 seeds and one student x
3 folds x 1 seed; TTA at scales 1 and 0.5 with flip and 32x32 sliding windows; maps at stride 2.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from pipeline.core.errors import PipelineError, run_cli
from pipeline.core.runs import load_model_params, parse_model_params
from pipeline.data.manifest import ClassInfo, Frame, write_classes, write_manifest
from pipeline.data.splits import write_folds
from pipeline.inference.mapfile import stored_bytes, write_probs
from pipeline.inference.tta import TTAConfig, forward_passes, predict_probs_batch
from pipeline.launch import costs
from pipeline.launch.inputs import plan_from_params
from pipeline.launch.measure import model_size, untrained_model
from pipeline.launch.plan import check_map_disk
from pipeline.launch.table import format_plan
from pipeline.parallel import main

from conftest import REPO, TINY_MODEL

CLASSES = 5
# (video, frames, height, width, fold); the test video has no fold
TRAIN_VIDEOS = [("v0", 3, 48, 64, 0), ("v1", 2, 48, 64, 1), ("v2", 2, 40, 40, 2),
                ("v3", 1, 40, 40, 0)]
TEST_VIDEOS = [("t0", 2, 48, 64)]
# TTA passes per frame: scale 1 of 48x64 needs windows at rows [0, 16] x columns [0, 16, 32]
# (32x32 crops every 16 px) = 6, scale 0.5 (24x32) fits one crop = 1; x2 flip = 14.
# 40x40: rows [0, 8] x columns [0, 8] = 4, scale 0.5 (20x20) = 1; x2 flip = 10.
PASSES = {(48, 64): 14, (40, 40): 10}
# map bytes, stride 2, uint8: 5 x ceil(48/2) x ceil(64/2) = 3840; 5 x 20 x 20 = 2000
MAP_BYTES = {(48, 64): 3840, (40, 40): 2000}
OOF_PASSES = 5 * 14 + 3 * 10     # every train frame once per member (all 3 folds run)
OOF_BYTES = 5 * 3840 + 3 * 2000  # = 25,200 per member
TEST_PASSES, TEST_BYTES = 2 * 14, 2 * 3840   # per run: every run predicts every test frame
RUNS = {"a": 3 * 2, "b": 3 * 2, "a_kd": 3 * 1}
MEMBERS = {"a": 2, "b": 2, "a_kd": 1}
MAPS_TOTAL = 5 * OOF_BYTES + 15 * TEST_BYTES  # = 241,200


@pytest.fixture
def ws(tmp_path):
    """params.yaml, data/ (manifest and classes; the images are never read) and folds.csv."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    a = {**copy.deepcopy(TINY_MODEL), "iters": 10, "val_interval": 5,
         "swa": {"iters": 4, "interval": 2}}
    b = {**copy.deepcopy(TINY_MODEL), "iters": 10, "val_interval": 5, "swa": {"iters": 0},
         "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9}}
    kd = {**copy.deepcopy(TINY_MODEL), "batch_size": 2, "iters": 6, "val_interval": 3,
          "swa": {"iters": 0}, "distill": {"teacher": "a"}}
    params["models"] = {"a": a, "b": b, "a_kd": kd}
    params["train"].update(models=["a", "b"], students=[{"name": "a_kd", "teacher": "a"}],
                           folds=[0, 1, 2], seeds=[0, 1], student_seeds=[0], device="cpu")
    params["folds"]["n_folds"] = 3
    params["infer"].update(tta={"scales": [1.0, 0.5], "flip": True, "crop_hw": [32, 32],
                                "overlap": 0.5}, quant="uint8", stride=2, splits=["oof", "test"],
                           compare_single=True, out=str(tmp_path / "oof_preds"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    frames, folds = [], []
    for video, n, h, w, fold in TRAIN_VIDEOS:
        for k in range(n):
            frames.append(Frame(id=f"{video}_{k}", image=str(tmp_path / "x.png"), mask=None,
                                video=video, frame=k, split="train", height=h, width=w))
            folds.append(fold)
    for video, n, h, w in TEST_VIDEOS:
        frames += [Frame(id=f"{video}_{k}", image=str(tmp_path / "x.png"), mask=None, video=video,
                         frame=k, split="test", height=h, width=w) for k in range(n)]
    write_manifest(tmp_path / "data" / "manifest.csv", frames)
    write_classes(tmp_path / "data" / "classes.json",
                  ClassInfo(names=[f"c{i}" for i in range(CLASSES)], palette=[]))
    train = [f for f in frames if f.split == "train"]
    write_folds(tmp_path / "folds" / "folds.csv", ids=[f.id for f in train],
                videos=[f.video for f in train], folds=folds)
    return SimpleNamespace(root=tmp_path, params=tmp_path / "params.yaml",
                           data=tmp_path / "data", folds=tmp_path / "folds" / "folds.csv")


def plan_of(ws, **kwargs) -> dict:
    return plan_from_params(params_path=ws.params, data_dir=ws.data, folds_path=ws.folds,
                            **kwargs)


def rows(plan: dict) -> dict[str, dict]:
    return {r["config"]: r for r in plan["rows"]}


def test_counts_match_the_hand_computation(ws):
    plan = plan_of(ws)
    assert plan["runs"]["total"] == 2 * 3 * 2 + 1 * 3 * 1 == 15
    assert plan["runs"]["members"] == 5
    by = rows(plan)
    assert {n: r["runs"] for n, r in by.items()} == RUNS
    # training images: (iters + swa iters) x batch per run
    assert by["a"]["images_seen"] == (10 + 4) * 4 * 6
    assert by["b"]["images_seen"] == 10 * 4 * 6
    assert by["a_kd"]["images_seen"] == 6 * 2 * 3
    for name, row in by.items():
        assert row["tta_passes_oof"] == MEMBERS[name] * OOF_PASSES
        assert row["tta_passes_test"] == RUNS[name] * TEST_PASSES
        assert row["oof_map_bytes"] == MEMBERS[name] * OOF_BYTES
        assert row["test_map_bytes"] == RUNS[name] * TEST_BYTES
    assert plan["total"]["map_bytes"] == MAPS_TOTAL == 241_200
    # other passes. a: 3 validations (5, 10 and the end of SWA, 14) x 8 fold frames, and SWA's
    # BatchNorm pass in batches of 4 over the other folds + its check on the fold:
    # fold 0 (4 frames): 4 + 4, folds 1 and 2 (2 frames): 8 + 2 each; per seed 24 + 28
    assert by["a"]["other_passes"] == 2 * (3 * 8 + (4 + 4) + 2 * (8 + 2))
    assert by["b"]["other_passes"] == 2 * (2 * 8)     # validations at 5 and 10, no SWA
    # the student: validations at 3 and 6, and its teacher's forward of every training image
    assert by["a_kd"]["other_passes"] == 2 * 8 + 6 * 2 * 3


def test_tta_passes_are_the_forwards_tta_makes():
    class Counter(torch.nn.Module):
        seen = 0

        def forward(self, x):
            Counter.seen += x.shape[0]
            return torch.zeros(x.shape[0], CLASSES, *x.shape[2:])

    tta = TTAConfig(scales=(1.0, 0.5), flip=True, crop_hw=(32, 32), overlap=0.5, batch_size=3,
                    amp=False)
    for size, passes in PASSES.items():
        Counter.seen = 0
        predict_probs_batch(Counter(), torch.zeros(1, 3, *size), tta=tta, num_classes=CLASSES)
        assert forward_passes(size, tta=tta) == Counter.seen == passes


def test_map_bytes_are_the_stored_codes_of_a_map(tmp_path):
    for (h, w), expected in MAP_BYTES.items():
        probs = np.full((CLASSES, h, w), 1 / CLASSES, dtype=np.float32)
        write_probs(tmp_path / "m.npz", probs, quant="uint8", stride=2, compress=0)
        with np.load(tmp_path / "m.npz") as npz:
            assert npz["probs"].nbytes == expected
        assert stored_bytes(classes=CLASSES, height=h, width=w, stride=2) == expected
        assert stored_bytes(classes=CLASSES, height=h, width=w, stride=2,
                            quant="float16") == 2 * expected


def test_topk_maps_shrink_the_planned_bytes(ws, tmp_path, capsys):
    """infer.topk 2 of 5 classes: 2 uint8 codes + 2 uint8 class ids per pixel, 4/5 of dense."""
    params = yaml.safe_load(ws.params.read_text())
    params["infer"]["topk"] = 2
    ws.params.write_text(yaml.safe_dump(params, sort_keys=False))
    plan = plan_of(ws, with_models=False)
    assert plan["infer"]["topk"] == 2
    assert plan["total"]["map_bytes"] == MAPS_TOTAL * 4 // 5 == 192_960
    assert plan["per_frame"]["map_bytes"] == MAP_BYTES[(48, 64)] * 4 // 5
    text = format_plan(plan)
    assert "uint8, stride 2, top-2 of 5 classes: 2 x ceil(48/2) x ceil(64/2) x (1 + 1) B" in text
    for (h, w), dense in MAP_BYTES.items():   # what a written top-k map holds, uncompressed
        probs = np.random.default_rng(h).dirichlet(np.ones(CLASSES), size=(h, w))
        write_probs(tmp_path / "m.npz", probs.transpose(2, 0, 1).astype(np.float32),
                    quant="uint8", stride=2, compress=0, topk=2)
        with np.load(tmp_path / "m.npz") as npz:
            stored = npz["probs"].nbytes + npz["top_class"].nbytes
        assert stored == stored_bytes(classes=CLASSES, height=h, width=w, stride=2,
                                      topk=2) == dense * 4 // 5
    params["infer"]["topk"] = CLASSES
    ws.params.write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(PipelineError, match="infer.topk must be below the 5 classes"):
        plan_of(ws, with_models=False)


def test_checkpoint_bytes_follow_the_state_dict(ws):
    plan = plan_of(ws)
    cfg = load_model_params("a", ws.params)
    weight_bytes, trainable = model_size(cfg, num_classes=CLASSES)
    cpu = untrained_model(cfg, num_classes=CLASSES)   # the meta-device count is exact
    assert weight_bytes == sum(t.numel() * t.element_size() for t in cpu.state_dict().values())
    assert trainable == sum(p.numel() for p in cpu.parameters())
    # a logit-adjusted head reads its prior: counted on the CPU instead of the meta device
    cosine = parse_model_params("la", {**TINY_MODEL, "logit_adjust": {"enabled": True}})
    cpu = untrained_model(cosine, num_classes=CLASSES)
    assert model_size(cosine, num_classes=CLASSES) == (
        sum(t.numel() * t.element_size() for t in cpu.state_dict().values()),
        sum(p.numel() for p in cpu.parameters()))
    a, b = rows(plan)["a"], rows(plan)["b"]
    # AdamW last.pt: weights + 2 moments; best.pt and swa.pt: weights; 2 snapshots of weights
    assert a["checkpoint_bytes"] == 6 * (weight_bytes + 2 * 4 * trainable + 2 * weight_bytes)
    assert a["snapshot_bytes"] == 6 * 2 * weight_bytes
    assert b["checkpoint_bytes"] == 6 * (2 * weight_bytes + 4 * trainable)  # SGD momentum
    assert b["snapshot_bytes"] == 0


def test_without_folds_file_the_frames_split_evenly_over_n_folds(ws):
    ws.folds.unlink()
    plan = plan_of(ws, with_models=False)
    assert "split evenly" in plan["data"]["folds"]
    assert plan["total"]["map_bytes"] == MAPS_TOTAL   # every fold runs: every frame once


def test_given_numbers_stand_in_for_data_not_prepared(ws):
    shutil.rmtree(ws.data)
    ws.folds.unlink()
    empty = plan_of(ws, with_models=False)
    assert empty["data"] is None and empty["total"]["map_bytes"] is None
    assert rows(empty)["a"]["images_seen"] == (10 + 4) * 4 * 6   # params-only numbers remain
    assert "unknown" in format_plan({**empty, "weights_counted_for_classes": None})
    plan = plan_of(ws, frames=300, test_frames=30, height=48, width=64, classes=CLASSES,
                   with_models=False)
    assert plan["total"]["oof_map_bytes"] == 5 * 300 * 3840
    assert plan["total"]["test_map_bytes"] == 15 * 30 * 3840
    assert plan["total"]["tta_passes_oof"] == 5 * 300 * 14
    with pytest.raises(PipelineError, match="--height and --width"):
        plan_of(ws, frames=300, with_models=False)


def test_device_hours_from_the_params_throughput(ws):
    params = yaml.safe_load(ws.params.read_text())
    params["plan"] = {"train_images_per_s": 100.0, "infer_views_per_s": 1000.0}
    ws.params.write_text(yaml.safe_dump(params, sort_keys=False))
    for row in plan_of(ws, with_models=False)["rows"]:
        passes = row["tta_passes_oof"] + row["tta_passes_test"] + row["other_passes"]
        want = (row["images_seen"] / 100 + passes / 1000) / 3600
        assert row["device_hours"] == pytest.approx(want)


def test_probe_gives_every_model_a_throughput(ws):
    plan = plan_of(ws, probe=True)
    for row in plan["rows"]:
        assert math.isfinite(row["train_images_per_s"]) and row["train_images_per_s"] > 0
        assert math.isfinite(row["infer_views_per_s"]) and row["infer_views_per_s"] > 0
        assert row["device_hours"] > 0
    assert "probe on cpu" in format_plan(plan)


def test_disk_check_refuses_when_the_maps_exceed_the_free_disk(ws, monkeypatch, capsys):
    argv = ["--dry-run", "--params", str(ws.params), "--data", str(ws.data),
            "--folds", str(ws.folds), "--logs", str(ws.root / "logs")]
    free = {"bytes": MAPS_TOTAL - 1}
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda path: SimpleNamespace(total=10**12, used=0, free=free["bytes"]))
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: infer.out")
    assert f"{MAPS_TOTAL:,} bytes" in err[0] and f"{MAPS_TOTAL - 1:,} bytes" in err[0]
    assert "--no-disk-check" in err[0]
    main(argv + ["--no-disk-check"])   # the switch overrides it
    assert "== disk" not in capsys.readouterr().out
    free["bytes"] = MAPS_TOTAL
    main(argv)
    out = capsys.readouterr().out
    assert "== disk: maps up to 241.2 KB" in out and out.index("== disk") < out.index("== members")
    assert check_map_disk(map_bytes=MAPS_TOTAL, folder=ws.root / "not" / "yet") == MAPS_TOTAL


def test_plan_cli_prints_the_table_and_writes_json(ws, capsys):
    out_json = ws.root / "plan.json"
    main(["--plan", "--params", str(ws.params), "--data", str(ws.data), "--folds", str(ws.folds),
          "--json", str(out_json)])
    out = capsys.readouterr().out
    for text in ("config", "images seen", "TTA passes", "OOF maps", "total", "a_kd",
                 "241.2 KB", "upper bound before compression", "3 folds", "15 = 2 models"):
        assert text in out, text
    plan = json.loads(out_json.read_text())
    assert plan["total"]["map_bytes"] == MAPS_TOTAL
    assert [r["config"] for r in plan["rows"]] == ["a", "b", "a_kd"]
    with pytest.raises(PipelineError, match="go with --plan"):
        main(["--dry-run", "--params", str(ws.params), "--frames", "10"])


# The flagship configs at their dataset's full size (--plan's numbers). VSPW: train+val 3,149
# videos of about 222,000 frames, test 387 videos of about 29,600 (frame counts approximate);
# --videos counts the train videos the OOF sample is drawn from. Cityscapes: 2,975 train + 500
# val frames in the folds, 1,525 test frames.
FULL_SIZE = {
    "vspw": {"frames": 222_000, "test_frames": 29_600, "videos": 3_149, "height": 480,
             "width": 853, "classes": 124},
    "cityscapes": {"frames": 2_975 + 500, "test_frames": 1_525, "height": 1024, "width": 2048,
                   "classes": 19},
}
MEMBER_BUDGET = 100 * 10**9   # one member's maps (OOF + test over its fold runs), bytes


def _hand_map_bytes(*, classes: int, height: int, width: int, stride: int, quant: str,
                    topk: int) -> int:
    """One map's arrays by hand: dense, C codes per pixel; top-k, K codes + K class ids."""
    code = 1 if quant == "uint8" else 2
    per_pixel = classes * code if not topk else topk * (code + (1 if classes <= 255 else 2))
    return per_pixel * math.ceil(height / stride) * math.ceil(width / stride)


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_flagship_config_at_full_size_keeps_a_member_under_100_gb(name, monkeypatch, tmp_path):
    """configs/<name>.yaml at the dataset's full size: every fold runs, so a member predicts
    each sampled OOF frame once and every test frame once per fold run."""
    shape = FULL_SIZE[name]
    plan = plan_from_params(params_path=REPO / "configs" / f"{name}.yaml", data_dir=tmp_path,
                            folds_path=tmp_path / "folds.csv", with_models=False, **shape)
    infer, params = plan["infer"], yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    per_map = _hand_map_bytes(classes=shape["classes"], height=shape["height"],
                              width=shape["width"], stride=infer["stride"], quant=infer["quant"],
                              topk=infer["topk"])
    assert plan["per_frame"]["map_bytes"] == per_map
    sample = params["infer"].get("oof_sample") or {}
    cap = sample.get("windows", 0) * sample.get("length", 16)
    if cap and sample.get("every_nth_video", 1) == 1:   # every video, each longer than the cap
        assert shape["frames"] // shape["videos"] > cap
        oof_frames = shape["videos"] * cap
    else:
        assert not cap and sample.get("every_nth_video", 1) == 1
        oof_frames = shape["frames"]
    assert plan["data"]["oof_frames"] == oof_frames
    n_folds = len(params["train"]["folds"])
    assert n_folds == params["folds"]["n_folds"]   # every fold runs: each OOF frame once
    member = (oof_frames + n_folds * shape["test_frames"]) * per_map
    assert member < MEMBER_BUDGET
    for row in plan["rows"]:
        seeds = len(row["seeds"])
        assert row["oof_map_bytes"] == seeds * oof_frames * per_map
        assert row["test_map_bytes"] == seeds * n_folds * shape["test_frames"] * per_map
        assert (row["oof_map_bytes"] + row["test_map_bytes"]) // seeds == member
    assert plan["total"]["map_bytes"] == plan["runs"]["members"] * member
    # what the settings bought: dense uint8 maps at stride 2 put one member over the budget
    dense = _hand_map_bytes(classes=shape["classes"], height=shape["height"],
                            width=shape["width"], stride=2, quant="uint8", topk=0)
    assert (shape["frames"] + n_folds * shape["test_frames"]) * dense > MEMBER_BUDGET
    # the disk check still refuses a disk one byte short of all members' maps
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: SimpleNamespace(free=plan["total"]["map_bytes"] - 1))
    with pytest.raises(PipelineError, match="GB"):
        check_map_disk(map_bytes=plan["total"]["map_bytes"], folder=tmp_path)


def test_vspw_config_at_full_size_plans_64_gb_per_member(tmp_path):
    """The issue's case: configs/vspw.yaml over VSPW (480x853, 124 classes) at stride 4, top-5
    and 2 windows of 16 frames per train video: 256,800 B per map, 63.9 GB per member."""
    plan = plan_from_params(params_path=REPO / "configs" / "vspw.yaml", data_dir=tmp_path,
                            folds_path=tmp_path / "folds.csv", with_models=False,
                            **FULL_SIZE["vspw"])
    assert plan["infer"]["topk"] == 5 and plan["infer"]["stride"] == 4
    per_map = 5 * (1 + 1) * math.ceil(480 / 4) * math.ceil(853 / 4)
    assert plan["per_frame"]["map_bytes"] == per_map == 256_800
    assert plan["data"]["oof_frames"] == 3_149 * 2 * 16 == 100_768
    member = (100_768 + 5 * 29_600) * per_map
    assert member == 63_883_622_400 < MEMBER_BUDGET
    assert plan["runs"]["members"] == 9 and plan["runs"]["total"] == 45
    assert plan["total"]["map_bytes"] == 9 * member   # 575.0 GB


def test_costs_helpers():
    assert costs.even_split(10, 3) == [4, 3, 3] and sum(costs.even_split(7, 7)) == 7
    assert costs.validations(iters=10, swa_iters=0, val_interval=3) == 4   # 3, 6, 9, 10
    assert costs.human_bytes(25_900_000_000_000) == "25.9 TB"
    assert costs.human_bytes(999) == "999 B" and costs.human_count(25_000) == "25.0 k"
    with pytest.raises(PipelineError, match="valid: adamw, sgd"):
        costs.optimizer_states("lion")
