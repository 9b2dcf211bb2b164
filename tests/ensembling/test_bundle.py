"""Predicting new images with the fitted ensemble (pipeline/predict.py) and its offline bundle
(pipeline/bundle.py), on real tiny runs: the labels are the argmax of the fused float maps of the
members' TTA probabilities, agree with ``--apply`` on the stored maps, and a bundle predicts the
same labels from anywhere."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import bundle as bundle_stage
from pipeline import predict as predict_stage
from pipeline.core.names import ALL_FOLDS
from pipeline.core.runs import RunPaths
from pipeline.data.dataset import SegmentationDataset
from pipeline.data.manifest import read_classes, read_manifest
from pipeline.data.transforms import eval_transform
from pipeline.ensembling.apply import apply_ensemble
from pipeline.ensembling.bundle import BUNDLE_FORMAT, BUNDLE_INDEX, BUNDLE_VERSION, read_bundle
from pipeline.ensembling.folder import Agreement
from pipeline.infer import main as infer_main
from pipeline.inference.tta import TTAConfig, predict_probs
from pipeline.models.checkpoint import model_from_checkpoint
from pipeline.submission.packing import make_submission

TTA = {"scales": [0.75, 1.0], "flip": True}
# S: tiny_s0 (folds 0, 1 and a --fold all run with a quarter of its test map); A: tiny_s1
GROUPS = {"S": ["tiny_s0"], "W": [], "A": ["tiny_s1"]}
MIXES = {"tiny_s0": {"f0": 0.375, "f1": 0.375, "fall": 0.25}, "tiny_s1": {"f0": 0.5, "f1": 0.5}}
ALPHA, BETA = 0.5, 0.7


def build_workspace(ws, root: Path, *, groups=GROUPS, mixes=MIXES, quant: str = "float16") -> dict:
    """A workspace under ``root``: the demo's runs (trained once per session) of the members of
    ``groups``, their maps (``infer.quant``: ``quant``), a weights.json with ``mixes`` and
    alpha/beta, ``--apply``'s test_pred, and a flat folder of the test images named by id."""
    params = ws.write_params(root / "params.yaml", infer={
        "tta": TTA, "quant": quant, "device": "cpu", "compare_single": False,
        "out": str(root / "oof_preds")})
    for member, mix in mixes.items():
        seed = int(member.rsplit("_s", 1)[1])
        for key in mix:
            fold = ALL_FOLDS if key == "fall" else int(key[1:])
            run = ws.train(fold=fold, seed=seed)
            infer_main([str(run.root), "--params", str(params), "--data", str(ws.data),
                        "--folds", str(ws.folds), "--no-progress"])
    out = root / "ensemble"
    out.mkdir()
    (out / "weights.json").write_text(json.dumps({
        "groups": groups, "alpha": ALPHA, "beta": BETA, "fallback": None,
        "members": {m: {"test_weights": mix} for m, mix in mixes.items()}}))
    apply_ensemble(oof_root=root / "oof_preds", data_dir=ws.data, out_dir=out, progress=False)
    images = root / "images"
    images.mkdir()
    for frame in read_manifest(ws.manifest, split="test"):
        shutil.copy(frame.image, images / f"{frame.id}.png")
    return {"root": root, "params": params, "weights": out / "weights.json", "runs": ws.runs,
            "data": ws.data, "images": images, "test_pred": out / "test_pred"}


def workspace_args(w: dict) -> list[str]:
    return ["--weights", str(w["weights"]), "--runs", str(w["runs"]), "--data", str(w["data"]),
            "--params", str(w["params"]), "--device", "cpu", "--no-progress"]


def labels_of(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


@pytest.fixture(scope="module")
def workspace(demo_workspace, tmp_path_factory):
    w = build_workspace(demo_workspace, tmp_path_factory.mktemp("predict"))
    w["pred"] = w["root"] / "pred"
    w["summary"] = predict_stage.main([str(w["images"]), "--out", str(w["pred"]),
                                       *workspace_args(w)])
    return w


def test_labels_are_the_argmax_of_the_fused_tta_maps(workspace, demo_workspace):
    """Recomputed here from the checkpoints, without the ensemble's code: per run the TTA
    softmax, per member its recorded mix, then P_S + alpha P_W + beta P_A."""
    ws, w = demo_workspace, workspace
    classes = read_classes(ws.classes)
    tta = TTAConfig(scales=tuple(TTA["scales"]), flip=True)
    frames = read_manifest(ws.manifest, split="test")[:2]
    predicted = labels_of(w["pred"])
    for frame in frames:
        image = SegmentationDataset([frame], classes=classes, transform=eval_transform(),
                                    with_mask=False)[0]["image"]
        member_maps = {}
        for member, mix in MIXES.items():
            seed = int(member.rsplit("_s", 1)[1])
            probs = {}
            for key in mix:
                fold = ALL_FOLDS if key == "fall" else int(key[1:])
                model, _ = model_from_checkpoint(ws.train(fold=fold, seed=seed).final_weights())
                probs[key] = predict_probs(model, image, tta=tta,
                                           num_classes=classes.num_classes).numpy()
            folds = np.mean([probs[k] for k in mix if k != "fall"], axis=0)
            w_all = mix.get("fall", 0.0)
            member_maps[member] = (1 - w_all) * folds + w_all * probs["fall"] if w_all else folds
        fused = member_maps["tiny_s0"] + BETA * member_maps["tiny_s1"]
        expected = fused.argmax(0)
        got = predicted[frame.id]
        # float32 sums in another order: only an exact tie could differ
        margin = np.sort(fused, axis=0)[-1] - np.sort(fused, axis=0)[-2]
        assert np.array_equal(got[margin > 1e-5], expected[margin > 1e-5])
        assert got.shape == (frame.height, frame.width) and got.dtype == np.uint8


def test_names_are_the_image_stems_and_labels_agree_with_apply(workspace):
    w = workspace
    predicted, applied = labels_of(w["pred"]), labels_of(w["test_pred"])
    assert sorted(p.name for p in w["pred"].iterdir()) == sorted(
        f"{p.stem}.png" for p in w["images"].iterdir())
    assert sorted(predicted) == sorted(applied)
    agreement = Agreement()
    for name, labels in predicted.items():
        agreement.add(labels, applied[name])
    assert agreement.fraction >= 0.999, agreement
    assert w["summary"]["images"] == len(predicted) and w["summary"]["runs"] == 5


def test_bundle_holds_the_checkpoints_and_settings(workspace, tmp_path):
    w = workspace
    out = tmp_path / "ensemble.bundle"
    index = bundle_stage.main([str(out), *[a for a in workspace_args(w)
                                           if a not in ("--device", "cpu")]])
    with zipfile.ZipFile(out) as zf:
        stored = json.loads(zf.read(BUNDLE_INDEX))
        names = sorted(zf.namelist())
        entries = {r["entry"]: zf.read(r["entry"]) for m in stored["members"].values()
                   for r in m["runs"]}
    assert stored == json.loads(json.dumps(index))
    assert stored["format"] == BUNDLE_FORMAT and stored["version"] == BUNDLE_VERSION
    assert names == sorted([BUNDLE_INDEX, *entries])
    assert stored["groups"] == GROUPS and (stored["alpha"], stored["beta"]) == (ALPHA, BETA)
    assert stored["tta"]["scales"] == TTA["scales"] and stored["submit"]["format"] == "folder"
    assert stored["classes"]["names"] == read_classes(w["data"] / "classes.json").names
    for member, info in stored["members"].items():
        assert {r["key"]: r["weight"] for r in info["runs"]} == MIXES[member]
        for run in info["runs"]:
            source = RunPaths(w["runs"] / run["run"]).final_weights().read_bytes()
            assert entries[run["entry"]] == source
            assert run["sha256"] == hashlib.sha256(source).hexdigest()
    # the same workspace gives the same bytes
    again = tmp_path / "again.bundle"
    bundle_stage.main([str(again), *[a for a in workspace_args(w) if a not in ("--device", "cpu")]])
    assert again.read_bytes() == out.read_bytes()
    assert read_bundle(out).mix("tiny_s0") == {0: 0.375, 1: 0.375, ALL_FOLDS: 0.25}


def test_bundle_predicts_the_same_labels_from_another_folder(workspace, tmp_path, monkeypatch):
    w = workspace
    out = tmp_path / "ensemble.bundle"
    bundle_stage.main([str(out), *[a for a in workspace_args(w) if a not in ("--device", "cpu")]])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no weights.json, runs/, data/ or params.yaml here
    predict_stage.main([str(w["images"]), "--out", "pred", "--bundle", str(out), "--device",
                        "cpu", "--no-progress"])
    got, expected = labels_of(elsewhere / "pred"), labels_of(w["pred"])
    assert sorted(got) == sorted(expected)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


def test_zip_in_the_submission_format_and_the_agreement_measurement(workspace, tmp_path, capsys):
    w = workspace
    # the workspace's own submission zip, made from --apply's labels of the stored maps
    submitted = make_submission(pred_dir=w["test_pred"], data=w["data"], out_dir=tmp_path / "sub",
                                name="submission", fmt="auto", previews=0, progress=False)
    zip_path = tmp_path / "sub" / submitted["zip"]
    summary = predict_stage.main([str(w["images"]), "--out", str(tmp_path / "mine"), "--zip",
                                  "--compare", str(zip_path), *workspace_args(w)])
    assert summary["agreement"] >= 0.999 and summary["compared_pixels"] == sum(
        a.size for a in labels_of(w["pred"]).values())
    assert "agreement with" in capsys.readouterr().out
    with zipfile.ZipFile(summary["zip"]) as mine, zipfile.ZipFile(zip_path) as theirs:
        assert sorted(mine.namelist()) == sorted(theirs.namelist())
        for name in mine.namelist():
            assert np.array_equal(np.asarray(Image.open(mine.open(name))),
                                  labels_of(w["pred"])[Path(name).stem])
    assert (tmp_path / "mine" / "submission.json").is_file()


def test_a_jpeg_is_predicted_under_its_stem(workspace, tmp_path):
    w = workspace
    images = tmp_path / "images"
    images.mkdir()
    first = sorted(w["images"].iterdir())[0]
    Image.open(first).save(images / "holiday photo.JPG", quality=95)
    shutil.copy(first, images / "b.png")
    predict_stage.main([str(images), "--out", str(tmp_path / "pred"), *workspace_args(w)])
    got = labels_of(tmp_path / "pred")
    assert sorted(got) == ["b", "holiday photo"]
    assert np.array_equal(got["b"], labels_of(w["pred"])[first.stem])


def test_a_member_mix_of_an_older_weights_file_is_its_fold_runs_mean(workspace, tmp_path):
    """weights.json without test_weights: the fold runs (not the --fold all one) share it."""
    w = workspace
    weights = json.loads(w["weights"].read_text())
    del weights["members"]
    older = tmp_path / "weights.json"
    older.write_text(json.dumps(weights))
    out = tmp_path / "b.bundle"
    args = [a if a != str(w["weights"]) else str(older) for a in workspace_args(w)]
    bundle_stage.main([str(out), *[a for a in args if a not in ("--device", "cpu")]])
    assert read_bundle(out).mix("tiny_s0") == {0: 0.5, 1: 0.5}

