"""The report stage on small fake chain outputs: figures are valid PNGs, the summary's numbers
are those of the inputs (pooled where they should be), missing parts are skipped with a note,
and a chain without runs is a one-line CLI error."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.curves import TRAIN, VAL
from pipeline.core.errors import PipelineError, run_cli
from pipeline.core.runs import RunPaths
from pipeline.data.manifest import ClassInfo, Frame, write_classes, write_manifest
from pipeline.evaluation.metrics import iou_per_class, mean_iou
from pipeline.inference.members import run_map_dir, write_run_meta
from pipeline.report import main
from pipeline.reporting import summary as reports

from test_curves import write_curve

NAMES = ["sky", "road", "car"]
PALETTE = [[10, 20, 30], [200, 0, 0], [0, 250, 0]]
VAL_FRAMES = {0: 3, 1: 1}          # unequal, so a weighted mean differs from a plain one
SCORES = {  # (model, fold): (last_miou, swa_miou, oof_miou_tta of infer_metrics.json)
    ("unet", 0): (0.40, 0.45, 0.47), ("unet", 1): (0.20, 0.30, 0.33),
    ("aux", 0): (0.10, 0.15, 0.16), ("aux", 1): (0.30, 0.25, 0.26)}


def random_cm(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 50, size=(3, 3)) + np.diag(rng.integers(20, 200, size=3))


def write_runs(root: Path, *, swa: bool = True, infer: bool = True) -> None:
    for (model, fold), (last, swa_miou, tta) in SCORES.items():
        run = root / "runs" / f"{model}_f{fold}_s0"
        curves = RunPaths(run).curves
        for name, value in (("lr", lambda i: 0.001), ("loss", lambda i: 2.0 / i),
                            ("ce", lambda i: 2.0 / i), ("images_per_s", lambda i: 50.0)):
            write_curve(curves, TRAIN, name, [(i, value(i)) for i in (1, 2, 3, 4)])
        write_curve(curves, VAL, "miou", [(2, last / 2), (4, last)])
        write_curve(curves, VAL, "pixel_acc", [(2, 0.5), (4, 0.6)])
        (run / "metrics.json").write_text(json.dumps(
            {"fold": fold, "seed": 0, "val_frames": VAL_FRAMES[fold], "last_miou": last}))
        (run / "train").mkdir()
        (run / "train" / "class_iou.json").write_text(json.dumps(
            {"iter": 4, "per_class_iou": dict(zip(NAMES, [last, 2 * last, 0.0]))}))
        if swa:
            (run / "swa_metrics.json").write_text(json.dumps(
                {"last_miou": last, "swa_miou": swa_miou, "gain": swa_miou - last}))
        if infer:
            (run / "infer_metrics.json").write_text(json.dumps(
                {"member": f"{model}_s0", "fold": fold, "oof_frames": VAL_FRAMES[fold],
                 "oof_miou_single": tta - 0.01, "oof_miou_tta": tta}))


def write_member_maps(root: Path, rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """meta.json of each fold (no maps: the report reads only the confusion matrices)."""
    cms = {}
    for model, family in (("unet", "primary"), ("aux", "swin")):
        cms[f"{model}_s0"] = []
        for fold in (0, 1):
            cm_tta, cm_single = random_cm(rng), random_cm(rng)
            cms[f"{model}_s0"].append((cm_tta, cm_single))
            write_run_meta(run_map_dir(root / "oof_preds", f"{model}_s0", fold),
                           {"member": f"{model}_s0", "model": model, "fold": fold, "seed": 0,
                            "family": family, "classes": 3, "class_names": NAMES,
                            "quant": "uint8", "stride": 1, "oof_cm_tta": cm_tta.tolist(),
                            "oof_cm_single": cm_single.tolist()})
    return cms


def write_ensemble(root: Path, fused: np.ndarray, *, stale: bool = False) -> dict:
    ens = root / "ensemble"
    ens.mkdir()
    metrics = {"frames": 10, "members": 2, "alpha": 0.0, "beta": 0.7}
    for i, row in enumerate(reports.ENSEMBLE_ROWS):
        metrics.update({f"{row}_mIoU": 0.5 + i / 100, f"{row}_mVC8": 0.8, f"{row}_mVC16": 0.7})
    metrics["S_W_A_mIoU"] = mean_iou(fused) + (0.01 if stale else 0.0)
    (ens / "metrics.json").write_text(json.dumps(metrics))
    (ens / "members.json").write_text(json.dumps({"unet_s0": {"group": "S"}, "aux_s0": {"group": "A"}}))
    Image.new("RGB", (20, 10), (1, 2, 3)).save(ens / "heatmap.png")
    (ens / "confusion.json").write_text(json.dumps({"S_W_A": fused.tolist()}))
    return metrics


def write_submission(root: Path) -> dict:
    sub = root / "submissions"
    (sub / "previews" / "sub").mkdir(parents=True)
    Image.new("RGB", (16, 8), (9, 9, 9)).save(sub / "previews" / "sub" / "t0.png")
    (sub / "sub.zip").write_bytes(b"PK fake")
    (sub / "sub.json").write_text(json.dumps(
        {"name": "sub", "zip": "sub.zip", "sha256": hashlib.sha256(b"PK fake").hexdigest(),
         "frames": 2, "format": "folder",
         "previews": ["previews/sub/t0.png"], "oof_score": 0.6}))
    evaluation = {"mIoU": 0.42, "mVC8": 0.9, "mVC16": 0.85,
                  "per_class": {n: {"iou": v} for n, v in zip(NAMES, [0.5, None, 0.34])}}
    (sub / "sub.zip.eval.json").write_text(json.dumps(evaluation))
    return evaluation


def report(root: Path, **kw) -> dict:
    args = dict(runs_dir=root / "runs", oof_dir=root / "oof_preds", ensemble_dir=root / "ensemble",
                submissions_dir=root / "submissions", data_dir=root / "data", out_dir=root / "reports",
                name="sub", progress=False)
    return reports.build_report(**{**args, **kw})


@pytest.fixture
def chain(tmp_path) -> dict:
    rng = np.random.default_rng(0)
    write_runs(tmp_path)
    cms = write_member_maps(tmp_path, rng)
    fused = random_cm(rng)
    write_classes(tmp_path / "data" / "classes.json", ClassInfo(names=NAMES, palette=PALETTE))
    return {"root": tmp_path, "cms": cms, "fused": fused, "metrics": write_ensemble(tmp_path, fused),
            "eval": write_submission(tmp_path)}


def assert_png(path: Path) -> None:
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 0 and img.size[1] > 0
        img.verify()


def test_full_chain_figures_and_numbers(chain):
    root, cms = chain["root"], chain["cms"]
    summary = report(root)
    out = root / "reports"
    for name in (reports.CURVES, reports.CLASS_IOU, reports.CONFUSION, reports.HEATMAP, "overlays/t0.png"):
        assert name in summary["figures"]
    for name in summary["figures"]:
        assert_png(out / name)
    assert (out / "overlays/t0.png").read_bytes() == (root / "submissions/previews/sub/t0.png").read_bytes()
    assert summary["notes"] == []
    assert json.loads((out / "summary.json").read_text()) == summary

    rows = {r["member"]: r for r in summary["members"]}
    assert set(rows) == {"unet_s0", "aux_s0"}
    for member, model in (("unet_s0", "unet"), ("aux_s0", "aux")):
        row = rows[member]
        weights = [VAL_FRAMES[f] for f in (0, 1)]
        for key, col in (("last_mIoU", 0), ("swa_mIoU", 1)):
            want = np.average([SCORES[(model, f)][col] for f in (0, 1)], weights=weights)
            assert row[key] == pytest.approx(want)
        assert row["swa_tta_mIoU"] == pytest.approx(mean_iou(sum(t for t, _ in cms[member])))
        assert row["swa_single_mIoU"] == pytest.approx(mean_iou(sum(s for _, s in cms[member])))
        assert row["tta_source"] == "pooled" and row["val_frames"] == sum(weights)
    assert rows["unet_s0"]["group"] == "S" and rows["aux_s0"]["family"] == "swin"

    ens = summary["ensemble"]
    assert ens["beta"] == 0.7
    for row in reports.ENSEMBLE_ROWS:
        assert ens["rows"][row]["mIoU"] == chain["metrics"][f"{row}_mIoU"]
    sub = summary["submission"]
    assert sub["zip"] == str(root / "submissions" / "sub.zip")
    assert sub["test_mIoU"] == chain["eval"]["mIoU"] and sub["test_mVC16"] == chain["eval"]["mVC16"]
    md = (out / "summary.md").read_text()
    assert f"{100 * rows['unet_s0']['swa_tta_mIoU']:.2f}" in md and "| S_W_A |" in md
    assert str(root / "submissions" / "sub.zip") in md and "test mIoU 42.00 %" in md


def test_confusion_and_class_bars_use_the_right_matrices(chain, monkeypatch):
    root, cms = chain["root"], chain["cms"]
    plotted = {}
    monkeypatch.setattr(reports, "plot_confusion",
                        lambda path, cm, names, title: plotted.update(cm=cm, names=names))
    monkeypatch.setattr(reports, "plot_class_iou",
                        lambda path, series, names: plotted.update(series=series, bar_names=names))
    report(root)
    np.testing.assert_array_equal(plotted["cm"], chain["fused"])  # fused OOF when it is current
    assert plotted["names"] == NAMES == plotted["bar_names"]
    pooled = {m: sum(t for t, _ in folds) for m, folds in cms.items()}
    best = max(pooled, key=lambda m: mean_iou(pooled[m]))
    series = list(plotted["series"].values())
    np.testing.assert_allclose(series[0], iou_per_class(pooled[best]))
    np.testing.assert_allclose(series[1], iou_per_class(chain["fused"]))
    np.testing.assert_allclose(series[2], [0.5, np.nan, 0.34])
    assert list(plotted["series"])[0].startswith(best)

    # a cache that no longer reproduces metrics.json is not trusted: the best member instead
    for path in (root / "ensemble").iterdir():
        path.unlink()
    (root / "ensemble").rmdir()
    write_ensemble(root, chain["fused"], stale=True)
    report(root)
    np.testing.assert_array_equal(plotted["cm"], pooled[best])


def test_partial_chain_skips_with_notes(tmp_path):
    write_runs(tmp_path, swa=False, infer=True)
    summary = report(tmp_path)
    assert summary["figures"] == [reports.CURVES, reports.CLASS_IOU]
    for name in summary["figures"]:
        assert_png(tmp_path / "reports" / name)
    notes = "\n".join(summary["notes"])
    for missing in ("data/classes.json", "oof_preds", "ensemble/heatmap.png", "ensemble/metrics.json",
                    "submissions/sub.json", "sub.zip.eval.json", "overlays skipped", "confusion matrix"):
        assert missing in notes
    assert all("\n" not in note for note in summary["notes"])
    assert summary["ensemble"] is None and summary["submission"] is None
    row = {r["member"]: r for r in summary["members"]}["unet_s0"]
    assert row["swa_mIoU"] is None and row["swa_folds"] == 0
    assert row["last_mIoU"] == pytest.approx((3 * 0.40 + 1 * 0.20) / 4)  # metrics.json fallback
    assert row["swa_tta_mIoU"] == pytest.approx((3 * 0.47 + 1 * 0.33) / 4)
    assert row["tta_source"] == "fold mean"
    md = (tmp_path / "reports" / "summary.md").read_text()
    assert "## Skipped" in md and "## Ensemble" not in md

    # SWA averaged on one fold of two: the mean covers that fold and says so
    (tmp_path / "runs" / "unet_f1_s0" / "swa_metrics.json").write_text(json.dumps(
        {"last_miou": 0.20, "swa_miou": 0.30, "gain": 0.10}))
    row = {r["member"]: r for r in report(tmp_path)["members"]}["unet_s0"]
    assert (row["swa_mIoU"], row["swa_folds"]) == (pytest.approx(0.30), 1)
    assert "| 30.00 (1/2) |" in (tmp_path / "reports" / "summary.md").read_text()


def test_fold_mean_counts_only_scored_folds():
    assert reports.fold_mean([(0.5, 3), (None, 1), (0.1, 1)]) == (pytest.approx(0.4), 2)
    assert reports.fold_mean([(0.5, None), (0.1, 4)]) == (pytest.approx(0.3), 2)  # equal weights
    assert reports.fold_mean([(None, 2)]) == (None, 0)


def test_drawn_overlays_show_image_gt_and_prediction(chain):
    root = chain["root"]
    data, pred_dir = root / "data", root / "ensemble" / "test_pred"
    pred_dir.mkdir()
    rng = np.random.default_rng(1)
    frames = []
    for i in range(6):
        image = rng.integers(0, 255, size=(8, 10, 3), dtype=np.uint8)
        gt = rng.integers(0, 3, size=(8, 10), dtype=np.uint8)
        gt[0, 0] = 255
        Image.fromarray(image).save(data / f"t{i}.png")
        Image.fromarray(gt, mode="L").save(data / f"t{i}_gt.png")
        Image.fromarray((gt % 255 + 1) % 3, mode="L").save(pred_dir / f"t{i}.png")
        frames.append(Frame(id=f"t{i}", image=str(data / f"t{i}.png"), mask=str(data / f"t{i}_gt.png"),
                            video=f"v{i // 3}", frame=i % 3, split="test", height=8, width=10))
    write_manifest(data / "manifest.csv", frames)
    summary = report(root, submissions_dir=root / "none")
    shown = sorted(p for p in summary["figures"] if p.startswith("overlays/"))
    assert len(shown) == reports.MAX_OVERLAYS
    with Image.open(root / "reports" / shown[0]) as img:
        canvas = np.asarray(img)
    k = 256 // 8
    assert canvas.shape == (8 * k, (3 * 10 + 2 * 4) * k, 3)
    frame = frames[int(Path(shown[0]).stem[1:])]
    image = np.asarray(Image.open(frame.image))
    gt = np.asarray(Image.open(frame.mask))
    palette = reports.palette_table(ClassInfo(names=NAMES, palette=PALETTE))
    np.testing.assert_array_equal(canvas[::k, ::k][:, :10], image)
    np.testing.assert_array_equal(canvas[::k, ::k][:, 14:24], palette[gt])
    np.testing.assert_array_equal(canvas[::k, ::k][:, 28:38], palette[(gt % 255 + 1) % 3])
    assert (canvas[::k, ::k][:, 10:14] == 255).all() and (palette[255] == 0).all()


def test_rerun_replaces_the_report_but_keeps_foreign_folders(chain):
    root = chain["root"]
    report(root)
    (root / "reports" / "overlays" / "stale.png").write_bytes(b"old")
    report(root)
    assert not (root / "reports" / "overlays" / "stale.png").exists()
    foreign = root / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(PipelineError, match="not a report folder"):
        report(root, out_dir=foreign)
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]


def test_corrupt_input_names_the_file(chain):
    root = chain["root"]
    (root / "runs" / "unet_f0_s0" / "swa_metrics.json").write_text("{not json")
    with pytest.raises(PipelineError, match="unet_f0_s0/swa_metrics.json"):
        report(root)
    assert not (root / "reports").exists()


def test_cli_prints_the_summary(chain, capsys):
    root = chain["root"]
    args = ["--runs", str(root / "runs"), "--oof", str(root / "oof_preds"), "--ensemble",
            str(root / "ensemble"), "--submissions", str(root / "submissions"), "--data",
            str(root / "data"), "--out", str(root / "reports"), "--name", "sub", "--no-progress",
            "--headline", str(root / "metrics.json")]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, args)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out == (root / "reports" / "summary.md").read_text()
    assert out.startswith("# Run summary")
    head = json.loads((root / "metrics.json").read_text())  # the headline beside the report
    ensemble = json.loads((root / "ensemble" / "metrics.json").read_text())
    assert head["cv_miou"] == ensemble.get("submitted_mIoU", ensemble["S_W_A_mIoU"]) is not None


@pytest.mark.parametrize("layout", ["missing", "empty", "unrelated"])
def test_no_runs_is_a_one_line_cli_error(tmp_path, capsys, layout):
    runs = tmp_path / "runs"
    if layout != "missing":
        runs.mkdir()
    if layout == "unrelated":
        (runs / "notes").mkdir()
        (runs / "unet_f0_s0").mkdir()  # a run folder without metrics.json or curves
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["--runs", str(runs), "--out", str(tmp_path / "reports"), "--no-progress",
                       "--headline", str(tmp_path / "metrics.json")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(runs) in err and err.count("\n") == 1
    assert not (tmp_path / "reports").exists()


def test_ledger_pools_swa_matrices_and_reads_teachers_and_test_scores(chain):
    root, cms = chain["root"], chain["cms"]
    rng = np.random.default_rng(5)
    pooled = {"last": 0, "swa": 0}
    for fold in (0, 1):  # SWA vs last from the stored matrices, pooled over the folds
        path = root / "runs" / f"unet_f{fold}_s0" / "swa_metrics.json"
        metrics = json.loads(path.read_text())
        for kind in pooled:
            cm = random_cm(rng)
            pooled[kind] = pooled[kind] + cm
            metrics[f"{kind}_cm"] = cm.tolist()
        path.write_text(json.dumps(metrics))
    (root / "ensemble" / reports.TEST_SCORES).write_text(json.dumps(
        {"members": {"unet_s0": {"tta": 0.52}, "aux_s0": {"tta": 0.40}},
         "rows": {"best_single": 0.52, "S_W_A": 0.55}}))
    models = {"unet": {"arch": "Unet"}, "aux": {"arch": "Unet", "distill": {"teacher": "unet"}}}
    summary = report(root, models=models)
    rows = {r["member"]: r for r in summary["members"]}
    assert rows["unet_s0"]["last_mIoU"] == pytest.approx(mean_iou(pooled["last"]))
    assert rows["unet_s0"]["swa_mIoU"] == pytest.approx(mean_iou(pooled["swa"]))
    assert rows["unet_s0"]["swa_source"] == "pooled" and rows["aux_s0"]["swa_source"] == "fold mean"

    ledger = summary["ledger"]
    swa = {r["subject"]: r for r in ledger["rows"] if r["technique"] == "SWA vs last" and r["split"] == "oof"}
    assert swa["unet_s0"]["gain"] == pytest.approx(mean_iou(pooled["swa"]) - mean_iou(pooled["last"]))
    student = [r for r in ledger["rows"] if r["technique"] == "student vs teacher"]
    assert [(r["subject"], r["split"]) for r in student] == [("aux_s0 vs unet_s0", "oof"),
                                                             ("aux_s0 vs unet_s0", "test")]
    oof_gain = mean_iou(sum(t for t, _ in cms["aux_s0"])) - mean_iou(sum(t for t, _ in cms["unet_s0"]))
    assert student[0]["gain"] == pytest.approx(oof_gain)
    assert student[1]["gain"] == pytest.approx(0.40 - 0.52)
    ens_test = [r for r in ledger["rows"] if r["technique"] == "ensemble" and r["split"] == "test"]
    assert [r["gain"] for r in ens_test] == [pytest.approx(0.03)]
    md = (root / "reports" / "summary.md").read_text()
    assert "## Technique ledger" in md and "### test split" in md and "| aux_s0 vs unet_s0 |" in md
    assert ledger["bands"]["oof"] is None and "no noise band" in md  # one seed per model here


def test_a_score_or_json_of_another_zip_is_never_shown(chain):
    root = chain["root"]
    eval_path = root / "submissions" / "sub.zip.eval.json"
    evaluation = json.loads(eval_path.read_text())
    eval_path.write_text(json.dumps({**evaluation, "sha256": "cd" * 32}))
    summary = report(root)
    assert summary["submission"]["test_mIoU"] is None
    assert any("scores another zip" in note for note in summary["notes"])
    (root / "submissions" / "sub.zip").write_bytes(b"PK another zip")  # the JSON is stale now
    with pytest.raises(PipelineError, match="sub.json: describes another zip"):
        report(root, out_dir=root / "reports2")
