"""The ensemble stage on synthetic OOF/test maps with a planted best (alpha, beta): search,
grouping, the resumable Optuna study, the cache, --apply with the saved weights, and errors."""

from __future__ import annotations

import gc
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from PIL import Image

from pipeline import ensemble, ensembling, fusion
from pipeline.data.manifest import ClassInfo, Frame, default_palette, write_classes, write_manifest
from pipeline.errors import PipelineError, run_cli
from pipeline.metrics import confusion_matrix, mean_iou
from pipeline.probstore import list_members, run_map_dir, write_probs, write_run_meta

# Four kinds of pixel rows (gt class; S, W, A probabilities of 3 classes). Each is right only
# on one side of a threshold: T1 needs alpha > 0.95, T2 alpha < 1.05, T3 beta > 0.35 and T4
# beta < 0.45, so on a 0.1-step grid only (1.0, 0.4) gets every pixel right.
TYPES = [
    (1, [.62, .24, .14], [.2, .6, .2], [.4, .4, .2]),
    (0, [.66, .24, .10], [.2, .6, .2], [.4, .4, .2]),
    (2, [.50, .14, .36], [.4, .2, .4], [.2, .2, .6]),
    (2, [.32, .18, .50], [.4, .2, .4], [.6, .2, .2]),
]
PLANTED = (1.0, 0.4)
SHAPE = (8, 6)
GRID = [round(0.1 * i, 1) for i in range(21)]
SMALL = [0.0, 0.4, 0.9, 1.0, 1.1]
MEMBERS = {"strong_s0": "S", "strong_s1": "S", "weak_s0": "W", "weak_s1": "W", "aux_s0": "A"}
FAMILIES = {"strong": "primary", "weak": "primary", "aux": "swin"}


def pattern(shift: int = 0, tile: int = 1) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """gt uint8 [H, W] (a void pixel included) and the S, W, A maps float32 [3, H, W]; row r
    holds type (r + shift) % 4; ``tile``: the pattern repeated tile x tile times."""
    kinds = [(r + shift) % 4 for r in range(SHAPE[0])]
    gt = np.array([[TYPES[k][0]] * SHAPE[1] for k in kinds], dtype=np.uint8)
    gt[0, 0] = 255
    maps = {g: np.stack([np.array(TYPES[k][i + 1], np.float32)[:, None].repeat(SHAPE[1], 1)
                         for k in kinds], axis=1)
            for i, g in enumerate(fusion.GROUPS)}
    return np.tile(gt, (tile, tile)), {g: np.tile(m, (1, tile, tile)) for g, m in maps.items()}


def build(root: Path, *, members=MEMBERS, videos: int = 4, frames: int = 10,
          ensemble_params: dict | None = None, quant: str = "float16",
          tile: int = 1) -> dict[str, Path]:
    """data/ (manifest with ``videos`` train videos of ``frames`` frames + one test video),
    oof_preds/ (2 folds: video v is out-of-fold in fold v % 2; test maps in both) and
    params.yaml. Each member's map is its group's pattern, shifted per video (and tiled)."""
    data, oof = root / "data", root / "oof_preds"
    rows = []
    for v in range(videos + 1):
        split = "test" if v == videos else "train"
        for i in range(frames):
            fid = f"v{v}_{i:02d}"
            gt, _ = pattern(v, tile)
            path = data / "masks" / f"{fid}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(gt, mode="L").save(path)
            rows.append(Frame(id=fid, image=str(data / "img.jpg"), mask=str(path), video=f"v{v}",
                              frame=i, split=split, height=gt.shape[0], width=gt.shape[1]))
    write_manifest(data / "manifest.csv", rows)
    write_classes(data / "classes.json", ClassInfo(names=["a", "b", "c"],
                                                   palette=default_palette(3)))
    for member, group in members.items():
        for fold in (0, 1):
            run = run_map_dir(oof, member, fold)
            counts = {"oof": 0, "test": 0}
            for f in rows:
                v = int(f.video[1:])
                split = "test" if f.split == "test" else ("oof" if v % 2 == fold else None)
                if split:
                    write_probs(run / split / f"{f.id}.npz", pattern(v, tile)[1][group],
                                quant=quant)
                    counts[split] += 1
            write_run_meta(run, {"member": member, "fold": fold, "seed": 0, "classes": 3,
                                 "quant": quant, "stride": 1, "checkpoint": "x.pt", "tta": {},
                                 "counts": counts})
    (oof / ".gitignore").write_text("/strong_s0\n")  # DVC writes one: not a member
    params = {"models": {name: {"family": fam} for name, fam in FAMILIES.items()},
              "ensemble": {"workers": 1, "chunk_frames": 7, **(ensemble_params or {})}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return {"data": data, "oof": oof, "out": root / "ensemble", "params": root / "params.yaml"}


def argv(ws: dict[str, Path], mode: str = "--search") -> list[str]:
    return [mode, "--oof", str(ws["oof"]), "--data", str(ws["data"]), "--out", str(ws["out"]),
            "--params", str(ws["params"]), "--no-progress"]


def explicit(**extra) -> dict:
    groups = {g: sorted(m for m, grp in MEMBERS.items() if grp == g) for g in fusion.GROUPS}
    return {"groups": groups, **extra}


@pytest.fixture
def searched(tmp_path):
    ws = build(tmp_path, ensemble_params=explicit(alpha_grid=SMALL, beta_grid=SMALL))
    return ws, ensemble.main(argv(ws))


def _brute_force(ws, alpha, beta) -> float:
    """mIoU of fusing the read maps at (alpha, beta), frame by frame, independently of fusion's
    grid code."""
    members = {m.name: m for m in list_members(ws["oof"])}
    cm = np.zeros((3, 3), np.int64)
    for v in range(4):
        for i in range(10):
            fid = f"v{v}_{i:02d}"
            maps = {g: [members[n].read_oof(fid) for n in sorted(MEMBERS) if MEMBERS[n] == g]
                    for g in fusion.GROUPS}
            ps, pw, pa = (sum(m[1:], m[0].copy()) / np.float32(len(m)) for m in maps.values())
            pred = (ps + np.float32(alpha) * pw + np.float32(beta) * pa).argmax(0).astype(np.uint8)
            cm += confusion_matrix(pattern(v)[0], pred, num_classes=3)
    return mean_iou(cm)


# ----------------------------------------------------------------------------- search
def test_search_finds_planted_weights_on_full_grid(tmp_path):
    ws = build(tmp_path, ensemble_params=explicit())
    result = ensemble.main(argv(ws))
    weights, metrics = result["weights"], result["metrics"]
    assert (weights["alpha"], weights["beta"]) == PLANTED
    assert weights["grid"] == {"alpha": GRID, "beta": GRID}
    assert weights["oof_mIoU"] == 1.0 and metrics["S_W_A_mIoU"] == 1.0
    # brute force agrees: the planted point is the only perfect one, its neighbours are worse
    assert _brute_force(ws, *PLANTED) == 1.0
    for a, b in [(0.9, 0.4), (1.1, 0.4), (1.0, 0.3), (1.0, 0.5), (0.0, 0.0)]:
        assert _brute_force(ws, a, b) < 1.0
    # the table: P_S alone misses T1 and T3; the ladder only climbs
    assert metrics["S_mIoU"] < metrics["S_W_mIoU"] < metrics["S_W_A_mIoU"]
    assert metrics["S_mIoU"] == pytest.approx(_brute_force(ws, 0.0, 0.0), abs=0)
    assert metrics["S_W_mIoU"] == pytest.approx(_brute_force(ws, metrics["alpha_S_W"], 0.0), abs=0)
    assert metrics["S_W_A_mVC8"] == 1.0 and metrics["S_W_A_mVC16"] is None  # 10-frame videos
    out = ws["out"]
    for name in ("weights.json", "metrics.json", "members.json", "heatmap.png", "study.db",
                 "grid_scores.npz"):
        assert (out / name).is_file(), name
    assert Image.open(out / "heatmap.png").format == "PNG"
    confusion = json.loads((out / "confusion.json").read_text())
    assert sorted(confusion) == sorted(ensembling.ROWS)
    for row in ensembling.ROWS:  # the matrices behind the table's mIoU
        assert mean_iou(np.asarray(confusion[row])) == metrics[f"{row}_mIoU"]
    study = optuna.load_study(study_name=ensembling.STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 21 * 21 and study.best_value == 1.0
    assert (study.best_params["alpha"], study.best_params["beta"]) == PLANTED


def test_every_grid_score_equals_brute_force(searched):
    ws, result = searched
    trials = optuna.load_study(study_name=ensembling.STUDY_NAME,
                               storage=f"sqlite:///{ws['out'] / 'study.db'}").trials
    assert len(trials) == len(SMALL) ** 2
    assert {(t.params["alpha"], t.params["beta"]) for t in trials} == {
        (a, b) for a in SMALL for b in SMALL}
    for trial in trials:
        assert trial.value == _brute_force(ws, trial.params["alpha"], trial.params["beta"])
    members = json.loads((ws["out"] / "members.json").read_text())
    assert {n: m["group"] for n, m in members.items()} == MEMBERS
    assert members["strong_s0"]["oof_mIoU"] == pytest.approx(_brute_force(ws, 0.0, 0.0), abs=0)


def test_auto_groups_rank_the_primary_family(tmp_path):
    members = {**MEMBERS, "weak_s2": "W", "aux_s1": "W"}  # aux_s1: worse than aux_s0
    ws = build(tmp_path, members=members,
               ensemble_params={"n_strong": 2, "n_aux": 1, "alpha_grid": SMALL, "beta_grid": [0, 0.4]})
    weights = ensemble.main(argv(ws))["weights"]
    assert weights["groups"] == {"S": ["strong_s0", "strong_s1"],
                                 "W": ["weak_s0", "weak_s1", "weak_s2"], "A": ["aux_s0"]}
    table = json.loads((ws["out"] / "members.json").read_text())
    scores = [m["oof_mIoU"] for m in table.values()]
    assert scores == sorted(scores, reverse=True)  # ranked
    primary = [n for n in table if table[n]["family"] == "primary"]
    assert primary[:2] == ["strong_s0", "strong_s1"] and table["aux_s1"]["group"] is None
    assert table["aux_s1"]["family"] == "swin"


def _store_meta_cms(ws, bump: str | None = None, swap: str | None = None) -> None:
    """Write "oof_cm_tta" into every run's meta.json as inference does (``bump``: that member's
    counts one pixel more; ``swap``: one of its wrong pixels counts as right)."""
    for member in list_members(ws["oof"]):
        for fold in member.folds:
            cm = np.zeros((3, 3), np.int64)
            for fid in member.oof_ids():
                if member.oof_fold(fid) == fold:
                    gt = pattern(int(fid[1:fid.index("_")]))[0]
                    cm += confusion_matrix(gt, member.read_oof(fid).argmax(0).astype(np.uint8),
                                           num_classes=3)
            cm[0, 0] += member.name == bump
            if member.name == swap and fold == member.folds[0]:
                row, col = np.unravel_index(np.argmax(cm - np.diag(np.diag(cm))), cm.shape)
                cm[row, col] -= 1  # a wrong pixel made right: the member only looks better
                cm[row, row] += 1
            path = member.run_dir(fold) / "meta.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "oof_cm_tta": cm.tolist()}))


def test_auto_groups_rank_by_meta_confusion_when_inference_stored_it(tmp_path, monkeypatch, capsys):
    ws = build(tmp_path, ensemble_params={"n_strong": 2, "alpha_grid": SMALL, "beta_grid": SMALL})
    calls = []
    original = fusion.score_pass
    monkeypatch.setattr(fusion, "score_pass",
                        lambda *a, **k: calls.append(k["desc"]) or original(*a, **k))
    without = ensemble.main(argv(ws))
    assert calls == ["rank members", "grid pass"]  # the fused rows come from its records
    _store_meta_cms(ws)
    calls.clear()
    with_meta = ensemble.main(argv(ws))
    assert calls == ["grid pass"]  # no ranking pass
    assert with_meta["metrics"] == without["metrics"]  # the same table, fewer rows scored
    assert with_meta["members"] == without["members"]
    for key in ("groups", "alpha", "beta", "oof_mIoU"):
        assert with_meta["weights"][key] == without["weights"][key]
    # explicit groups use the stored matrices too (no member row but the best one's to score)
    params = yaml.safe_load(ws["params"].read_text())
    params["ensemble"]["groups"] = without["weights"]["groups"]
    ws["params"].write_text(yaml.safe_dump(params))
    calls.clear()
    assert ensemble.main(argv(ws))["metrics"] == without["metrics"] and calls == ["grid pass"]
    _store_meta_cms(ws, bump="weak_s1")  # counts other pixels than the maps: every member
    err = _error(capsys, argv(ws))
    assert "weak_s1" in err and "oof_cm_tta" in err
    best = next(iter(json.loads((ws["out"] / "members.json").read_text())))
    _store_meta_cms(ws, swap=best)  # the same pixels, other predictions: checked on the best
    err = _error(capsys, argv(ws))
    assert best in err and "oof_cm_tta" in err


def test_resolve_groups_auto_and_explicit():
    names = ["a_s0", "b_s0", "c_s0", "d_s0", "e_s0"]
    scores = {"a_s0": .5, "b_s0": .7, "c_s0": .6, "d_s0": .9, "e_s0": .8}
    fams = {"a_s0": "p", "b_s0": "p", "c_s0": "p", "d_s0": "x", "e_s0": "x"}
    kw = {"names": names, "scores": scores, "families": fams, "primary_family": "p"}
    assert ensembling.resolve_groups(None, n_strong=1, n_aux=0, **kw) == {
        "S": ["b_s0"], "W": ["a_s0", "c_s0"], "A": ["d_s0", "e_s0"]}
    assert ensembling.resolve_groups(None, n_strong=5, n_aux=1, **kw)["A"] == ["d_s0"]
    given = {"S": ["e_s0"], "W": [], "A": ["a_s0"]}
    assert ensembling.resolve_groups(given, n_strong=1, n_aux=0, **kw) == given
    with pytest.raises(PipelineError, match="member 'zz'"):
        ensembling.resolve_groups({"S": ["zz"], "W": [], "A": []}, n_strong=1, n_aux=0, **kw)
    with pytest.raises(PipelineError, match="both S and A"):
        ensembling.resolve_groups({"S": ["a_s0"], "W": [], "A": ["a_s0"]}, n_strong=1, n_aux=0, **kw)
    with pytest.raises(PipelineError, match="no member of family 'q'.*families found: p, x"):
        ensembling.resolve_groups(None, n_strong=1, n_aux=0, **{**kw, "primary_family": "q"})


def test_empty_groups_fix_their_weight_at_zero(tmp_path):
    ws = build(tmp_path, ensemble_params={"groups": {"S": ["strong_s0"], "A": ["aux_s0"]},
                                          "alpha_grid": SMALL, "beta_grid": SMALL})
    weights = ensemble.main(argv(ws))["weights"]
    assert weights["grid"] == {"alpha": [0.0], "beta": SMALL}
    assert weights["alpha"] == 0.0 and weights["groups"]["W"] == []


def test_study_resumes_without_duplicates_and_cache_skips_the_pass(searched, monkeypatch):
    ws, first = searched
    storage = f"sqlite:///{ws['out'] / 'study.db'}"
    before = [(t.number, t.params, t.value) for t in optuna.load_study(
        study_name=ensembling.STUDY_NAME, storage=storage).trials]

    def no_pass(*args, **kwargs):
        raise AssertionError("the grid pass ran again")

    monkeypatch.setattr(fusion, "score_pass", no_pass)
    again = ensemble.main(argv(ws))
    after = [(t.number, t.params, t.value) for t in optuna.load_study(
        study_name=ensembling.STUDY_NAME, storage=storage).trials]
    assert after == before and again["weights"] == first["weights"]
    # a changed map changes the fingerprint: the pass runs and the study starts over
    monkeypatch.undo()
    path = run_map_dir(ws["oof"], "weak_s0", 0) / "oof" / "v0_03.npz"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    third = ensemble.main(argv(ws))
    assert third["weights"]["fingerprint"] != first["weights"]["fingerprint"]
    assert len(optuna.load_study(study_name=ensembling.STUDY_NAME, storage=storage).trials) == 25


def test_a_kept_study_with_other_values_decides_the_weights(searched, monkeypatch):
    # a study kept from an earlier run (same inputs) whose values differ from the grid's
    # scores: its best point is the one used, and the table's rows follow it
    ws, first = searched
    assert (first["weights"]["alpha"], first["weights"]["beta"]) == PLANTED
    with sqlite3.connect(ws["out"] / "study.db") as db:
        trial = db.execute("SELECT t.trial_id FROM trials t JOIN trial_params a ON "
                           "a.trial_id = t.trial_id AND a.param_name = 'alpha' JOIN trial_params "
                           "b ON b.trial_id = t.trial_id AND b.param_name = 'beta' WHERE "
                           "a.param_value = 0.4 AND b.param_value = 0.9").fetchone()[0]
        db.execute("UPDATE trial_values SET value = 2.0 WHERE trial_id = ?", (trial,))
    result = ensemble.main(argv(ws))
    weights, metrics = result["weights"], result["metrics"]
    assert (weights["alpha"], weights["beta"], weights["oof_mIoU"]) == (0.4, 0.9, 2.0)
    assert metrics["S_W_A_mIoU"] == _brute_force(ws, 0.4, 0.9) < 1.0
    assert metrics["S_mIoU"] == first["metrics"]["S_mIoU"]


def test_run_study_continues_a_partial_study(tmp_path):
    scores = {(a, b): -abs(a - 1) - abs(b - 0.4) for a in SMALL for b in SMALL}
    db = tmp_path / "study.db"
    storage = f"sqlite:///{db}"
    partial = optuna.create_study(study_name=ensembling.STUDY_NAME, storage=storage,
                                  direction="maximize",
                                  sampler=optuna.samplers.GridSampler({"alpha": SMALL, "beta": SMALL}))
    partial.set_user_attr("fingerprint", "fp")
    partial.optimize(lambda t: scores[(t.suggest_float("alpha", 0, 1.1),
                                       t.suggest_float("beta", 0, 1.1))], n_trials=6)
    trials = ensembling.run_study(scores=scores, alphas=SMALL, betas=SMALL, db=db, fingerprint="fp")
    assert len(trials) == 25
    assert len({(t.params["alpha"], t.params["beta"]) for t in trials}) == 25
    assert ensembling.best_point([(t.params["alpha"], t.params["beta"], t.value) for t in trials]) \
        == (1.0, 0.4, 0.0)
    assert len(ensembling.run_study(scores=scores, alphas=SMALL, betas=SMALL, db=db,
                                  fingerprint="fp")) == 25


def test_workers_give_the_same_result(tmp_path):
    ws = build(tmp_path, ensemble_params=explicit(alpha_grid=SMALL, beta_grid=SMALL, workers=2))
    result = ensemble.main(argv(ws))
    single = ensembling.search_ensemble(
        oof_root=ws["oof"], data_dir=ws["data"], out_dir=tmp_path / "one", workers=1,
        groups=explicit()["groups"], alphas=SMALL, betas=SMALL, progress=False)
    assert single["metrics"] == result["metrics"]
    assert single["weights"]["fingerprint"] == result["weights"]["fingerprint"]


# ----------------------------------------------------------------------------- apply
def _read_pred(ws, fid: str) -> np.ndarray:
    with Image.open(ws["out"] / "test_pred" / f"{fid}.png") as img:
        assert img.mode == "L"
        return np.asarray(img)


def test_apply_uses_the_saved_weights(searched, capsys):
    ws, _ = searched
    ensemble.main(argv(ws, "--apply"))
    files = sorted(p.name for p in (ws["out"] / "test_pred").iterdir())
    assert files == [f"v4_{i:02d}.png" for i in range(10)]
    gt, maps = pattern(4)
    labelled = gt != 255
    assert np.array_equal(_read_pred(ws, "v4_00")[labelled], gt[labelled])  # planted weights
    weights = json.loads((ws["out"] / "weights.json").read_text())
    weights.update(alpha=0.0, beta=0.0)
    (ws["out"] / "weights.json").write_text(json.dumps(weights))
    ensemble.main(argv(ws, "--apply"))
    pred = _read_pred(ws, "v4_00")
    assert np.array_equal(pred, maps["S"].argmax(0)) and not np.array_equal(pred[labelled], gt[labelled])
    weights.update(alpha=2.0, beta=0.0)
    (ws["out"] / "weights.json").write_text(json.dumps(weights))
    ensemble.main(argv(ws, "--apply"))
    expected = fusion.fuse_labels(maps["S"], maps["W"], maps["A"], alpha=2.0, beta=0.0)
    assert np.array_equal(_read_pred(ws, "v4_05"), expected)
    # maps re-made after the search (their meta.json differs): applied, with a warning
    meta = run_map_dir(ws["oof"], "strong_s1", 0) / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "checkpoint": "new.pt"}))
    capsys.readouterr()
    ensemble.main(argv(ws, "--apply"))
    assert "warning: strong_s1 changed since the search" in capsys.readouterr().err


# ----------------------------------------------------------------------------- errors
def _error(capsys, args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(ensemble.main, args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()  # a warning may come first
    assert lines[-1].startswith("error: ") and sum(ln.startswith("error") for ln in lines) == 1
    return lines[-1]


def test_errors_on_missing_or_empty_predictions(tmp_path, capsys):
    ws = build(tmp_path, members={"strong_s0": "S"}, videos=2, frames=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".gitignore").write_text("x\n")
    assert "no members" in _error(capsys, [*argv(ws), "--oof", str(empty)])
    assert "not found" in _error(capsys, [*argv(ws), "--oof", str(tmp_path / "nope")])
    assert "weights not found" in _error(capsys, argv(ws, "--apply"))


def test_errors_on_mismatched_maps(tmp_path, capsys):
    ws = build(tmp_path, videos=2, frames=3, ensemble_params=explicit(alpha_grid=SMALL))
    bad = run_map_dir(ws["oof"], "weak_s1", 1) / "oof" / "v1_02.npz"
    write_probs(bad, np.full((3, SHAPE[0], SHAPE[1] + 2), 1 / 3, np.float32))
    err = _error(capsys, argv(ws))
    assert "weak_s1" in err and "v1_02" in err and "[3, 8, 8]" in err
    write_probs(bad, np.full((3, *SHAPE), 1 / 3, np.float32))
    meta_path = run_map_dir(ws["oof"], "aux_s0", 0) / "meta.json"
    meta = json.loads(meta_path.read_text())
    for fold in (0, 1):
        path = run_map_dir(ws["oof"], "aux_s0", fold) / "meta.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "classes": 4}))
    assert "aux_s0" in (err := _error(capsys, argv(ws))) and "4 classes" in err
    for fold in (0, 1):
        path = run_map_dir(ws["oof"], "aux_s0", fold) / "meta.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "classes": 3}))
    assert meta["classes"] == 3
    missing = run_map_dir(ws["oof"], "strong_s1", 0) / "oof" / "v0_01.npz"
    missing.unlink()
    meta_path = run_map_dir(ws["oof"], "strong_s1", 0) / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "counts": {"oof": 2, "test": 3}}))
    err = _error(capsys, argv(ws))
    assert "strong_s1" in err and "'v0_01'" in err


def test_apply_errors_on_missing_members_and_test_maps(searched, capsys):
    ws, _ = searched
    test_map = run_map_dir(ws["oof"], "aux_s0", 0) / "test" / "v4_07.npz"
    test_map.unlink()
    test_map2 = run_map_dir(ws["oof"], "aux_s0", 1) / "test" / "v4_07.npz"
    test_map2.unlink()
    for fold in (0, 1):
        path = run_map_dir(ws["oof"], "aux_s0", fold) / "meta.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "counts": {"oof": 20, "test": 9}}))
    err = _error(capsys, argv(ws, "--apply"))
    assert "aux_s0" in err and "'v4_07'" in err
    assert not (ws["out"] / "test_pred").exists()  # nothing partial
    weights = json.loads((ws["out"] / "weights.json").read_text())
    weights["groups"]["W"].append("gone_s3")
    (ws["out"] / "weights.json").write_text(json.dumps(weights))
    err = _error(capsys, argv(ws, "--apply"))
    assert "gone_s3" in err and "weights.json" in err


def test_params_errors(tmp_path, capsys):
    ws = build(tmp_path, videos=2, frames=2, ensemble_params={"alpha_grid": [0.5, 1.0]})
    assert "must include 0" in _error(capsys, argv(ws))
    ws = build(tmp_path, videos=2, frames=2, ensemble_params={"groups": {"S": ["x"], "B": []}})
    assert "unknown group 'B'" in _error(capsys, argv(ws))
    ws = build(tmp_path, videos=2, frames=2, ensemble_params={"beta_grid": {"start": 0, "stop": 1}})
    assert "start, stop and step" in _error(capsys, argv(ws))
    assert ensembling.parse_grid({"start": 0, "stop": 0.3, "step": 0.1}, key="g") == [0, 0.1, 0.2, 0.3]
    ws = build(tmp_path, videos=2, frames=2)
    params = yaml.safe_load(ws["params"].read_text())
    del params["models"]["weak"]
    ws["params"].write_text(yaml.safe_dump(params))
    err = _error(capsys, argv(ws))
    assert "models.weak.family" in err and "weak_s0" in err


def test_apply_error_on_test_map_size_and_unusable_study(searched, capsys):
    ws, _ = searched
    for fold in (0, 1):  # (folds of one member that disagree are probstore's error)
        write_probs(run_map_dir(ws["oof"], "weak_s0", fold) / "test" / "v4_02.npz",
                    np.full((3, SHAPE[0] + 1, SHAPE[1]), 1 / 3, np.float32), quant="float16")
    err = _error(capsys, argv(ws, "--apply"))
    assert "weak_s0" in err and "'v4_02'" in err and "[3, 8, 6]" in err
    assert not (ws["out"] / "test_pred").exists()
    (ws["out"] / "study.db").write_bytes(b"not a database" * 100)
    err = _error(capsys, argv(ws))
    assert "study.db" in err and "cannot open the Optuna study" in err


def test_bulk_trial_insert_stores_what_add_trials_stores(tmp_path, monkeypatch):
    scores = {(a, b): a - 2 * b for a in SMALL for b in SMALL}
    ensembling.run_study(scores=scores, alphas=SMALL, betas=SMALL, db=tmp_path / "bulk.db",
                         fingerprint="fp")
    monkeypatch.setattr(ensembling, "_bulk_insert", lambda *args: False)  # Optuna's own path
    ensembling.run_study(scores=scores, alphas=SMALL, betas=SMALL, db=tmp_path / "orm.db",
                         fingerprint="fp")

    def stored(name):
        study = optuna.load_study(study_name=ensembling.STUDY_NAME,
                                  storage=f"sqlite:///{tmp_path / name}")
        return [(t.number, t.state, t.params, t.distributions, t.values, t.user_attrs,
                 t.system_attrs, t.datetime_start is not None, t.datetime_complete is not None)
                for t in study.trials], study.best_params

    bulk, orm = stored("bulk.db"), stored("orm.db")
    assert len(bulk[0]) == len(SMALL) ** 2
    assert bulk == orm
    assert bulk[1] == {"alpha": SMALL[-1], "beta": 0.0}


# ----------------------------------------------------------------------------- reliability
def _trial_points(db: Path) -> list[tuple[float, float]]:
    study = optuna.load_study(study_name=ensembling.STUDY_NAME, storage=f"sqlite:///{db}")
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    return [(t.params["alpha"], t.params["beta"]) for t in study.trials]


def test_search_killed_with_sigkill_resumes_to_the_same_outputs(tmp_path, repo_root):
    ws = build(tmp_path / "ws", ensemble_params=explicit(alpha_grid=SMALL, beta_grid=SMALL))
    out = ws["out"]

    def search(kill_at: str | None = None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "SEGPIPE_TEST_KILL_AT"}
        env.update(OMP_NUM_THREADS="1", **({"SEGPIPE_TEST_KILL_AT": kill_at} if kill_at else {}))
        return subprocess.run([sys.executable, str(repo_root / "pipeline" / "ensemble.py"),
                               "--search", "--no-progress"], cwd=tmp_path / "ws", env=env,
                              capture_output=True, text=True, timeout=300)

    # killed after the grid pass: its label records are left behind, nothing else
    assert search("pass").returncode == -signal.SIGKILL
    assert list(out.glob(f"{ensembling.RECORDS}*")) and not (out / "study.db").exists()
    # killed again once the study is stored, before any output
    assert search("study").returncode == -signal.SIGKILL
    assert len(_trial_points(out / "study.db")) == len(SMALL) ** 2
    assert not any((out / name).exists() for name in ("weights.json", "metrics.json",
                                                      "members.json", "grid_scores.npz"))
    done = search()
    assert done.returncode == 0, done.stderr
    clean = ensemble.main(argv({**ws, "out": tmp_path / "clean"}))
    weights = json.loads((out / "weights.json").read_text())
    assert (weights["alpha"], weights["beta"]) == PLANTED and weights["oof_mIoU"] == 1.0
    for key in ("alpha", "beta", "oof_mIoU", "groups", "grid", "fingerprint", "members"):
        assert weights[key] == clean["weights"][key], key
    assert json.loads((out / "metrics.json").read_text()) == clean["metrics"]
    points = _trial_points(out / "study.db")
    assert sorted(points) == sorted((a, b) for a in SMALL for b in SMALL)  # each exactly once
    assert weights["study"]["trials"] == len(points)
    assert not list(out.glob(f"{ensembling.RECORDS}*"))  # the records are cleaned up


def test_search_memory_does_not_grow_with_the_frames(tmp_path, monkeypatch):
    # The grid pass and the fused rows' work on each chunk (one video) of its records, the
    # parts that scale with the frames, are traced: their peak above what was held when each
    # started, numpy's allocations included. Two process-wide effects that depend on the rest
    # of the test session are set aside: cyclic garbage (numpy's .npy header parser leaves
    # some per array read) is collected after each chunk, with the session's objects frozen
    # out of the collector's way; and pathlib interns each file name it parses, in a table
    # that is reallocated whole (7.5 MB here) after so many insertions, so the workspace's
    # file names are interned, and held, beforehand.
    peaks: list[int] = []

    def traced(fn):
        def call(*args, **kwargs):
            tracemalloc.start()
            try:
                return fn(*args, **kwargs)
            finally:
                peaks.append(tracemalloc.get_traced_memory()[1])
                tracemalloc.stop()
        return call

    def collected(fn):
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            finally:
                gc.collect()
        return call

    members = {"strong_s0": "S", "weak_s0": "W", "aux_s0": "A"}
    groups = {g: [m for m, grp in members.items() if grp == g] for g in fusion.GROUPS}

    def peak(videos: int, name: str) -> int:
        ws = build(tmp_path / name, members=members, videos=videos, tile=8)
        names = [sys.intern(path.name) for path in (tmp_path / name).rglob("*")]
        peaks.clear()
        result = ensembling.search_ensemble(
            oof_root=ws["oof"], data_dir=ws["data"], out_dir=ws["out"], groups=groups,
            alphas=SMALL, betas=SMALL, workers=1, chunk_frames=2, progress=False)
        assert result["metrics"]["frames"] == videos * 10
        assert len(peaks) == 1 + videos and names  # the grid pass, each chunk's fused rows
        return max(peaks)

    for name, wrap in (("score_pass", traced), ("_pass_chunk", collected),
                       ("_rows_chunk", lambda fn: traced(collected(fn)))):
        monkeypatch.setattr(fusion, name, wrap(getattr(fusion, name)))
    gc.collect()
    gc.freeze()
    try:
        few, many = peak(3, "few"), peak(30, "many")  # 30 and 300 frames of 64 x 48
    finally:
        gc.unfreeze()
    one_map = 3 * 64 * 48 * 4  # float32 [C, H, W]
    assert few > 3 * one_map  # the pass holds a frame's maps...
    assert many < 1.5 * few, (few, many)  # ...but not those of more frames
