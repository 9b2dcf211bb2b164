"""infer.py: OOF and test maps of a run, coverage, TTA metrics, resume, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.manifest import read_classes, read_manifest
from pipeline.data.splits import read_folds
from pipeline.infer import main as infer_main
from pipeline.inference.mapfile import read_meta, read_probs
from pipeline.inference.members import Member, check_coverage
from pipeline.models.checkpoint import model_from_checkpoint


def _infer(ws, run_dir: Path, out: Path, *extra: str) -> dict:
    return infer_main([str(run_dir), "--params", str(ws.params), "--data", str(ws.data),
                       "--folds", str(ws.folds), "--out", str(out), "--no-progress", *extra])


@pytest.fixture(scope="module")
def two_folds(demo_workspace, tmp_path_factory):
    """Both fold runs of the tiny config, inferred with a 2-scale flip TTA into one maps root."""
    ws = demo_workspace
    root = tmp_path_factory.mktemp("infer")
    params = ws.write_params(root / "params.yaml", infer={
        "tta": {"scales": [0.75, 1.0], "flip": True}, "quant": "uint8", "stride": 1,
        "splits": ["oof", "test"], "compare_single": True, "device": "cpu", "num_workers": 0,
        "out": str(root / "oof_preds")})
    runs = [ws.train(fold=k) for k in range(ws.n_folds)]
    metrics = []
    for paths in runs:
        metrics.append(infer_main([str(paths.root), "--params", str(params), "--data", str(ws.data),
                                   "--folds", str(ws.folds), "--no-progress"]))
    return ws, params, root / "oof_preds", runs, metrics


def test_oof_maps_cover_every_train_frame_exactly_once(two_folds, demo_workspace):
    _, _, out, _, _ = two_folds
    member = Member(out / "tiny_s0")
    train_ids = sorted(read_folds(demo_workspace.folds))
    assert check_coverage(member, train_ids) == len(train_ids)
    assert member.oof_ids() == train_ids
    # each frame was predicted by the model of its own fold, which never trained on it
    folds = read_folds(demo_workspace.folds)
    assert all(member.oof_fold(i) == folds[i] for i in train_ids)


def test_test_maps_average_the_fold_models(two_folds, demo_workspace):
    _, _, out, _, _ = two_folds
    member = Member(out / "tiny_s0")
    test_ids = sorted(f.id for f in read_manifest(demo_workspace.manifest, split="test"))
    assert member.test_ids() == test_ids
    frame = test_ids[0]
    per_fold = [read_probs(member.run_dir(k) / "test" / f"{frame}.npz") for k in (0, 1)]
    np.testing.assert_allclose(member.read_test(frame), np.mean(per_fold, axis=0), atol=1e-6)


def test_maps_are_probabilities_of_the_right_shape_and_describe_themselves(two_folds, demo_workspace):
    _, _, out, runs, _ = two_folds
    classes = read_classes(demo_workspace.classes)
    frame = read_manifest(demo_workspace.manifest, split="train")[0]
    member = Member(out / "tiny_s0")
    probs = member.read_oof(frame.id)
    assert probs.shape == (classes.num_classes, frame.height, frame.width)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=classes.num_classes / 510 + 1e-5)
    meta = read_meta(member.run_dir(member.oof_fold(frame.id)) / "oof" / f"{frame.id}.npz")
    assert meta["quant"] == "uint8" and meta["meta"]["member"] == "tiny_s0"
    run_meta = member.meta[0]
    assert run_meta["tta"]["scales"] == [0.75, 1.0] and run_meta["tta"]["flip"] is True
    # the class names, in order, that the ensemble checks against data/classes.json
    assert run_meta["class_names"] == list(classes.names)
    assert Path(run_meta["checkpoint"]).name == "swa.pt" or Path(run_meta["checkpoint"]).name == "best.pt"
    assert run_meta["counts"]["oof"] == len(member.oof_ids()) - len(
        [i for i in member.oof_ids() if member.oof_fold(i) != 0])


def test_metrics_match_a_direct_computation(two_folds, demo_workspace):
    _, _, out, runs, metrics = two_folds
    from pipeline.data.manifest import read_mask
    from pipeline.evaluation.metrics import ConfusionMatrix, mean_iou

    classes = read_classes(demo_workspace.classes)
    member = Member(out / "tiny_s0")
    cm = ConfusionMatrix(num_classes=classes.num_classes)
    frames = {f.id: f for f in read_manifest(demo_workspace.manifest, split="train")}
    for frame_id in member.oof_ids():
        if member.oof_fold(frame_id) != 0:
            continue
        gt = read_mask(frames[frame_id].mask, classes.lut_array())
        cm.update(gt, member.read_oof(frame_id).argmax(0).astype(np.uint8))
    assert metrics[0]["oof_miou_tta"] == pytest.approx(mean_iou(cm.matrix), abs=1e-9)
    assert metrics[0]["views"] == 4
    assert 0.0 <= metrics[0]["oof_miou_single"] <= 1.0
    saved = json.loads((runs[0].root / "infer_metrics.json").read_text())
    assert saved["oof_miou_tta"] == metrics[0]["oof_miou_tta"]


def test_no_tta_equals_plain_inference(demo_workspace, tmp_path):
    ws = demo_workspace
    paths = ws.train(fold=0)
    _infer(ws, paths.root, tmp_path / "maps", "--no-tta")
    model, _ = model_from_checkpoint(paths.final_weights())
    frame_id = Member(tmp_path / "maps" / "tiny_s0").oof_ids()[0]
    frame = next(f for f in read_manifest(ws.manifest) if f.id == frame_id)
    from pipeline.data.dataset import SegmentationDataset
    from pipeline.data.transforms import eval_transform
    from pipeline.models.predict import forward_padded

    item = SegmentationDataset([frame], classes=read_classes(ws.classes), transform=eval_transform(),
                               with_mask=False)[0]
    expected = torch.softmax(forward_padded(model, item["image"][None]), 1)[0].numpy()
    got = Member(tmp_path / "maps" / "tiny_s0").read_oof(frame_id)
    assert np.abs(got - expected).max() <= 1 / 510 + 1e-5


def test_interrupted_inference_resumes_without_recomputing(demo_workspace, tmp_path, monkeypatch):
    ws = demo_workspace
    paths = ws.train(fold=0)
    out = tmp_path / "maps"
    reference = _infer(ws, paths.root, tmp_path / "ref", "--no-tta")

    import pipeline.inference.runner as inference

    calls = {"n": 0}
    real = inference.predict_probs_and_plain

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "predict_probs_and_plain", dying)
    with pytest.raises(KeyboardInterrupt):
        _infer(ws, paths.root, out, "--no-tta")
    run_dir = out / "tiny_s0" / "f0"
    assert not (run_dir / "meta.json").exists()  # incomplete runs carry no meta.json
    written = sorted(p.name for p in run_dir.rglob("*.npz"))
    assert len(written) == 3

    counted = {"n": 0}

    def counting(*args, **kwargs):
        counted["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "predict_probs_and_plain", counting)
    resumed = _infer(ws, paths.root, out, "--no-tta")
    total = resumed["oof_frames"] + resumed["test_frames"]
    assert counted["n"] == total - 3 and resumed["reused_maps"] == 3
    assert resumed["oof_miou_tta"] == reference["oof_miou_tta"]
    for path in (tmp_path / "ref").rglob("*.npz"):
        twin = out / path.relative_to(tmp_path / "ref")
        np.testing.assert_array_equal(read_probs(path), read_probs(twin))


def test_changed_settings_recompute_the_maps(demo_workspace, tmp_path):
    ws = demo_workspace
    paths = ws.train(fold=0)
    out = tmp_path / "maps"
    _infer(ws, paths.root, out, "--no-tta")
    again = _infer(ws, paths.root, out)  # default TTA now: old maps must not be reused
    assert again["reused_maps"] == 0 and again["views"] > 1


def test_errors_are_one_line(demo_workspace, tmp_path, capsys):
    from pipeline.core.errors import run_cli

    ws = demo_workspace
    with pytest.raises(SystemExit) as exc:
        run_cli(infer_main, [str(tmp_path / "nope"), "--params", str(ws.params)])
    assert exc.value.code == 2
    assert "run directory not found" in capsys.readouterr().err

    run = tmp_path / "empty_run"
    (run / "train").mkdir(parents=True)
    with pytest.raises(SystemExit) as exc:
        run_cli(infer_main, [str(run), "--params", str(ws.params)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "no finished training run" in err and err.count("\n") == 1

    paths = ws.train(fold=0)
    broken = tmp_path / "broken_run"
    shutil.copytree(paths.root, broken)
    for name in ("swa.pt", "train/best.pt", "train/last.pt"):
        if (broken / name).exists():
            (broken / name).write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exc:
        run_cli(infer_main, [str(broken), "--params", str(ws.params), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and str(broken) in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_member_summary_pools_the_folds(two_folds):
    from pipeline.inference.runner import member_summary

    _, _, out, _, metrics = two_folds
    summary = member_summary(Member(out / "tiny_s0"))
    assert summary["folds"]["0"]["oof_miou_tta"] == pytest.approx(metrics[0]["oof_miou_tta"])
    assert summary["folds"]["1"]["oof_miou_single"] == pytest.approx(metrics[1]["oof_miou_single"])
    # pooled over both folds: between the two folds' scores is not guaranteed for mIoU, but it
    # must equal the mIoU of the summed confusion matrices
    from pipeline.evaluation.metrics import mean_iou

    member = Member(out / "tiny_s0")
    cm = sum(np.asarray(member.meta[k]["oof_cm_tta"]) for k in (0, 1))
    assert summary["oof_miou_tta"] == pytest.approx(mean_iou(cm))


def test_single_view_score_is_absent_unless_measured(demo_workspace, tmp_path):
    ws = demo_workspace
    paths = ws.train(fold=0)
    params = ws.write_params(tmp_path / "params.yaml", infer={
        "tta": {"scales": [0.75, 1.0], "flip": True}, "compare_single": False, "device": "cpu"})
    run = [str(paths.root), "--params", str(params), "--data", str(ws.data), "--folds",
           str(ws.folds), "--no-progress"]
    tta_only = infer_main(run + ["--out", str(tmp_path / "a")])
    assert tta_only["oof_miou_single"] is None and tta_only["oof_miou_tta"] is not None
    assert Member(tmp_path / "a" / "tiny_s0").meta[0]["oof_cm_single"] is None
    plain = infer_main(run + ["--out", str(tmp_path / "b"), "--no-tta"])  # one view: it is the single
    assert plain["oof_miou_single"] == plain["oof_miou_tta"] is not None


def test_single_view_is_the_runs_own_validation_view(two_folds):
    """One view beside TTA (a by-product of its scale-1 forward here) scores the weights as
    training's validation did: same frames, same view, so TTA vs one view is a paired gain."""
    _, _, _, runs, metrics = two_folds
    for paths, m in zip(runs, metrics):
        trained = json.loads(paths.metrics.read_text())
        assert m["weights"] == "best.pt"
        assert m["oof_miou_single"] == pytest.approx(trained["best_miou"], abs=1e-12)


def test_infer_weights_choose_the_checkpoint_that_predicts(demo_workspace, tmp_path, capsys):
    """infer.weights: last predicts with train/last.pt (the maps say so); an explicit choice
    the run does not have (no EMA trained) is one line, nothing written."""
    from pipeline.core.errors import run_cli

    ws = demo_workspace
    paths = ws.train(fold=0)
    params = ws.write_params(tmp_path / "params.yaml", infer={
        "tta": {"scales": [1.0], "flip": False}, "weights": "last", "device": "cpu",
        "out": str(tmp_path / "maps")})
    _infer(ws, paths.root, tmp_path / "maps")  # auto
    auto_meta = read_meta(next((tmp_path / "maps").rglob("*.npz")))
    infer_main([str(paths.root), "--params", str(params), "--data", str(ws.data), "--folds",
                str(ws.folds), "--out", str(tmp_path / "last"), "--no-progress"])
    last_meta = read_meta(next((tmp_path / "last").rglob("*.npz")))
    assert last_meta["meta"]["weights"] == str(paths.last) != auto_meta["meta"]["weights"]
    ema = ws.write_params(tmp_path / "ema.yaml", infer={"weights": "ema", "device": "cpu"})
    with pytest.raises(SystemExit) as exc:
        run_cli(infer_main, [str(paths.root), "--params", str(ema), "--data", str(ws.data),
                             "--folds", str(ws.folds), "--out", str(tmp_path / "e"), "--no-progress"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "no ema weights for this run" in err and err.count("\n") == 1
    assert not (tmp_path / "e").exists()
