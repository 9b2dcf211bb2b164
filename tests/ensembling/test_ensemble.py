"""The ensemble stage on synthetic OOF/test maps with a planted best (alpha, beta): search,
grouping, the resumable Optuna study, the cache, --apply with the saved weights, and errors."""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from PIL import Image

from pipeline import ensemble
from pipeline.core.errors import PipelineError, run_cli
from pipeline.core.names import ENSEMBLE_ROWS
from pipeline.data.manifest import ClassInfo, Frame, default_palette, write_classes, write_manifest
from pipeline.data.splits import write_folds
from pipeline.ensembling import fusion, passes, records
from pipeline.ensembling.fit import RECORDS, best_point
from pipeline.ensembling.groups import resolve_groups
from pipeline.ensembling.lock import search_lock
from pipeline.ensembling.params import parse_grid
from pipeline.ensembling.search import search_ensemble
from pipeline.ensembling.fit import remove_leftovers
from pipeline.ensembling.study import STUDY_FILE, STUDY_NAME, open_study, run_study, work_path
from pipeline.evaluation.metrics import confusion_matrix, mean_iou
from pipeline.inference.mapfile import write_probs
from pipeline.inference.members import list_members, run_map_dir, write_run_meta

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
          tile: int = 1, train: dict | None = None, make_map=None) -> dict[str, Path]:
    """data/ (manifest with ``videos`` train videos of ``frames`` frames + one test video),
    folds/folds.csv, oof_preds/ (2 folds: video v is out-of-fold in fold v % 2; test maps in
    both) and params.yaml (with ``train`` as its train: section when given; without one every
    member found is ensembled). Each member's map is its group's pattern, shifted per video
    (and tiled), or ``make_map(member, gt)``."""
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
    train_rows = [f for f in rows if f.split == "train"]
    write_folds(root / "folds" / "folds.csv", ids=[f.id for f in train_rows],
                videos=[f.video for f in train_rows],
                folds=[int(f.video[1:]) % 2 for f in train_rows])
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
                    gt, maps = pattern(v, tile)
                    write_probs(run / split / f"{f.id}.npz",
                                make_map(member, gt) if make_map else maps[group], quant=quant)
                    counts[split] += 1
            write_run_meta(run, {"member": member, "fold": fold, "seed": 0, "classes": 3,
                                 "class_names": ["a", "b", "c"], "quant": quant, "stride": 1,
                                 "checkpoint": "x.pt", "tta": {}, "counts": counts})
    (oof / ".gitignore").write_text("/strong_s0\n")  # DVC writes one: not a member
    params = {"models": {name: {"family": fam} for name, fam in FAMILIES.items()},
              "ensemble": {"workers": 1, "chunk_frames": 7, **(ensemble_params or {})}}
    if train is not None:
        params["train"] = train
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return {"data": data, "oof": oof, "out": root / "ensemble", "params": root / "params.yaml",
            "folds": root / "folds" / "folds.csv"}


def argv(ws: dict[str, Path], mode: str = "--search") -> list[str]:
    return [mode, "--oof", str(ws["oof"]), "--data", str(ws["data"]), "--out", str(ws["out"]),
            "--params", str(ws["params"]), "--folds", str(ws["folds"]), "--no-progress"]


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


def journal(path: Path):
    """Optuna's own JournalStorage on the study's journal file (public API; optuna 3.x:
    JournalFileStorage)."""
    try:
        from optuna.storages.journal import JournalFileBackend
    except ImportError:  # optuna < 4.0
        from optuna.storages import JournalFileStorage as JournalFileBackend
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def load(path: Path) -> optuna.Study:
    """The study kept in the journal file ``path``, opened with Optuna's own tools."""
    return optuna.load_study(study_name=STUDY_NAME, storage=journal(path))


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
    assert (metrics["oof_frames"], metrics["oof_frames_missing"], metrics["partial"]) == (
        40, 0, False)
    assert metrics["fallback"] is None and weights["fallback"] is None
    out = ws["out"]
    for name in ("weights.json", "metrics.json", "members.json", "heatmap.png", STUDY_FILE,
                 "grid_scores.npz"):
        assert (out / name).is_file(), name
    assert Image.open(out / "heatmap.png").format == "PNG"
    confusion = json.loads((out / "confusion.json").read_text())
    assert sorted(confusion) == sorted(ENSEMBLE_ROWS)
    for row in ENSEMBLE_ROWS:  # the matrices behind the table's mIoU
        assert mean_iou(np.asarray(confusion[row])) == metrics[f"{row}_mIoU"]
    study = load(out / STUDY_FILE)
    assert len(study.trials) == 21 * 21 and study.best_value == 1.0
    assert (study.best_params["alpha"], study.best_params["beta"]) == PLANTED
    assert study.user_attrs == {"fingerprint": weights["fingerprint"],
                                "grid": {"alpha": GRID, "beta": GRID}}
    # weights.json says where the study is and how to open it: its Python runs as written
    assert weights["study"] == {
        "journal": (out / STUDY_FILE).as_posix(), "study_name": STUDY_NAME, "trials": 21 * 21,
        "open": f"optuna.load_study(study_name='{STUDY_NAME}', storage=optuna.storages."
                f"JournalStorage(optuna.storages.journal.JournalFileBackend("
                f"'{(out / STUDY_FILE).as_posix()}')))"}
    opened = eval(weights["study"]["open"], {"optuna": optuna})
    assert [(t.params, t.value) for t in opened.trials] == [
        (t.params, t.value) for t in study.trials]


def test_every_grid_score_equals_brute_force(searched):
    ws, result = searched
    trials = load(ws["out"] / STUDY_FILE).trials
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
    original = passes.score_pass
    monkeypatch.setattr(passes, "score_pass",
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
    assert resolve_groups(None, n_strong=1, n_aux=0, **kw) == {
        "S": ["b_s0"], "W": ["a_s0", "c_s0"], "A": ["d_s0", "e_s0"]}
    assert resolve_groups(None, n_strong=5, n_aux=1, **kw)["A"] == ["d_s0"]
    given = {"S": ["e_s0"], "W": [], "A": ["a_s0"]}
    assert resolve_groups(given, n_strong=1, n_aux=0, **kw) == given
    with pytest.raises(PipelineError, match="member 'zz'"):
        resolve_groups({"S": ["zz"], "W": [], "A": []}, n_strong=1, n_aux=0, **kw)
    with pytest.raises(PipelineError, match="both S and A"):
        resolve_groups({"S": ["a_s0"], "W": [], "A": ["a_s0"]}, n_strong=1, n_aux=0, **kw)
    with pytest.raises(PipelineError, match="no member of family 'q'.*families found: p, x"):
        resolve_groups(None, n_strong=1, n_aux=0, **{**kw, "primary_family": "q"})


def test_empty_groups_fix_their_weight_at_zero(tmp_path):
    ws = build(tmp_path, ensemble_params={"groups": {"S": ["strong_s0"], "A": ["aux_s0"]},
                                          "alpha_grid": SMALL, "beta_grid": SMALL})
    weights = ensemble.main(argv(ws))["weights"]
    assert weights["grid"] == {"alpha": [0.0], "beta": SMALL}
    assert weights["alpha"] == 0.0 and weights["groups"]["W"] == []


def test_study_resumes_without_duplicates_and_cache_skips_the_pass(searched, monkeypatch):
    ws, first = searched
    path = ws["out"] / STUDY_FILE
    before = [(t.number, t.params, t.value) for t in load(path).trials]
    kept = path.read_bytes()

    def no_pass(*args, **kwargs):
        raise AssertionError("the grid pass ran again")

    monkeypatch.setattr(passes, "score_pass", no_pass)
    again = ensemble.main(argv(ws))
    after = [(t.number, t.params, t.value) for t in load(path).trials]
    assert after == before and again["weights"] == first["weights"]
    assert path.read_bytes() == kept  # a complete study of the same inputs: nothing written
    # a changed map changes the fingerprint: the pass runs and the study starts over
    monkeypatch.undo()
    changed = run_map_dir(ws["oof"], "weak_s0", 0) / "oof" / "v0_03.npz"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    third = ensemble.main(argv(ws))
    assert third["weights"]["fingerprint"] != first["weights"]["fingerprint"]
    study = load(path)
    assert len(study.trials) == 25
    assert study.user_attrs["fingerprint"] == third["weights"]["fingerprint"]
    assert sorted(p.name for p in ws["out"].iterdir() if p.name.startswith(".")) == []


def test_a_kept_study_with_other_values_decides_the_weights(searched, monkeypatch):
    # a study kept from an earlier run (same inputs) whose values differ from the grid's
    # scores: its best point is the one used, and the table's rows follow it
    ws, first = searched
    assert (first["weights"]["alpha"], first["weights"]["beta"]) == PLANTED
    # the same study rewritten with Optuna's public API, one value changed
    path = ws["out"] / STUDY_FILE
    kept = load(path)
    path.unlink()
    other = optuna.create_study(study_name=STUDY_NAME, storage=journal(path),
                                direction="maximize")
    for key, value in kept.user_attrs.items():
        other.set_user_attr(key, value)
    other.add_trials([optuna.trial.create_trial(
        params=t.params, distributions=t.distributions,
        value=2.0 if (t.params["alpha"], t.params["beta"]) == (0.4, 0.9) else t.value)
        for t in kept.trials])
    result = ensemble.main(argv(ws))
    weights, metrics = result["weights"], result["metrics"]
    assert (weights["alpha"], weights["beta"], weights["oof_mIoU"]) == (0.4, 0.9, 2.0)
    assert metrics["S_W_A_mIoU"] == _brute_force(ws, 0.4, 0.9) < 1.0
    assert metrics["S_mIoU"] == first["metrics"]["S_mIoU"]


def test_run_study_continues_a_partial_study(tmp_path):
    scores = {(a, b): -abs(a - 1) - abs(b - 0.4) for a in SMALL for b in SMALL}
    file = tmp_path / STUDY_FILE
    partial = optuna.create_study(study_name=STUDY_NAME, storage=journal(file),
                                  direction="maximize",
                                  sampler=optuna.samplers.GridSampler({"alpha": SMALL, "beta": SMALL}))
    partial.set_user_attr("fingerprint", "fp")
    partial.optimize(lambda t: scores[(t.suggest_float("alpha", 0, 1.1),
                                       t.suggest_float("beta", 0, 1.1))], n_trials=6)
    trials = run_study(scores=scores, alphas=SMALL, betas=SMALL, file=file, fingerprint="fp")
    assert len(trials) == 25
    assert len({(t.params["alpha"], t.params["beta"]) for t in trials}) == 25
    assert best_point([(t.params["alpha"], t.params["beta"], t.value) for t in trials]) \
        == (1.0, 0.4, 0.0)
    assert len(run_study(scores=scores, alphas=SMALL, betas=SMALL, file=file,
                         fingerprint="fp")) == 25
    assert len(load(file).trials) == 25


def test_workers_give_the_same_result(tmp_path):
    ws = build(tmp_path, ensemble_params=explicit(alpha_grid=SMALL, beta_grid=SMALL, workers=2))
    result = ensemble.main(argv(ws))
    single = search_ensemble(
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
    write_probs(bad, np.full((3, SHAPE[0], SHAPE[1] + 2), 1 / 3, np.float32), quant="float16")
    err = _error(capsys, argv(ws))
    assert "weak_s1" in err and "v1_02" in err and "[3, 8, 8]" in err
    write_probs(bad, np.full((3, *SHAPE), 1 / 3, np.float32))  # another dtype than its member's
    err = _error(capsys, argv(ws))
    assert "weak_s1/f1/oof/v1_02.npz" in err and "quant uint8" in err and "float16" in err
    write_probs(bad, np.full((3, *SHAPE), 1 / 3, np.float32), quant="float16")
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
    assert parse_grid({"start": 0, "stop": 0.3, "step": 0.1}, key="g") == [0, 0.1, 0.2, 0.3]
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
    (ws["out"] / STUDY_FILE).write_bytes(b"not a database" * 100)
    err = _error(capsys, argv(ws))
    assert err == (f"error: {ws['out'] / STUDY_FILE}: cannot open the Optuna study (ValueError: "
                   f"line 1 is not an Optuna journal record); delete the file to start over")
    assert (ws["out"] / STUDY_FILE).read_bytes() == b"not a database" * 100  # left as it was


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a database" * 100)  # no newline: Optuna alone reads no record


def _garbage_lines(path: Path) -> None:
    path.write_bytes(b"garbage\nmore garbage\n")  # Optuna's reader: JSONDecodeError


def _not_records(path: Path) -> None:
    path.write_bytes(b'{"a": 1}\n')  # JSON, but not Optuna's records: its replay raises


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-40])  # the last record cut short (Optuna alone skips it)


def _no_newline(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1])


def _sqlite(path: Path) -> None:
    path.write_bytes(b"SQLite format 3\x00" + bytes(4080))  # a database's first page


@pytest.mark.parametrize("breaker, cause", [
    (_garbage, "ValueError: line 1 is not an Optuna journal record"),
    (_garbage_lines, "ValueError: line 1 is not an Optuna journal record"),
    (_not_records, "KeyError: 'op_code'"),
    (_truncated, "ValueError: line 28 is not an Optuna journal record"),  # 3 + 25 trials
    (_no_newline, "ValueError: its last line is incomplete"),
    (_sqlite, "ValueError: line 1 is not an Optuna journal record"),
])
def test_an_unusable_study_file_is_one_error_and_stays(tmp_path, breaker, cause):
    file = tmp_path / STUDY_FILE
    scores = {(a, b): a - b for a in SMALL for b in SMALL}
    run_study(scores=scores, alphas=SMALL, betas=SMALL, file=file, fingerprint="fp")
    breaker(file)
    broken = file.read_bytes()
    with pytest.raises(PipelineError) as err:
        open_study(alphas=SMALL, betas=SMALL, file=file, fingerprint="fp")
    assert str(err.value) == (f"{file}: cannot open the Optuna study ({cause}); delete the "
                              f"file to start over")
    assert file.read_bytes() == broken and sorted(p.name for p in tmp_path.iterdir()) == [
        STUDY_FILE]


def test_an_unreadable_work_file_is_started_over(tmp_path, capsys):
    # a killed search's unfinished study (only ever read by the search that resumes it) that
    # cannot be read is built again, not an error
    file = tmp_path / STUDY_FILE
    scores = {(a, b): a - b for a in SMALL for b in SMALL}
    work = work_path(file, "fp")
    work.write_bytes(b'{"op_code": 0, "worker_id": "w", "study_na')
    trials = run_study(scores=scores, alphas=SMALL, betas=SMALL, file=file, fingerprint="fp")
    assert "cannot be read; starting it over" in capsys.readouterr().out
    assert len(trials) == len(load(file).trials) == len(SMALL) ** 2 and not work.exists()


def test_study_holds_each_grid_point_once_with_its_exact_score(tmp_path):
    scores = {(a, b): a - 2 * b for a in SMALL for b in SMALL}
    trials = run_study(scores=scores, alphas=SMALL, betas=SMALL,
                       file=tmp_path / STUDY_FILE, fingerprint="fp")
    study = load(tmp_path / STUDY_FILE)  # Optuna's own tools
    stored = [(t.params["alpha"], t.params["beta"], t.value, t.state) for t in study.trials]
    assert stored == [(a, b, a - 2 * b, optuna.trial.TrialState.COMPLETE)
                      for a in SMALL for b in SMALL]  # grid order, once each
    assert len(trials) == len(SMALL) ** 2
    assert study.best_params == {"alpha": SMALL[-1], "beta": 0.0}
    assert study.user_attrs == {"fingerprint": "fp", "grid": {"alpha": SMALL, "beta": SMALL}}
    assert sorted(p.name for p in tmp_path.iterdir()) == [STUDY_FILE]  # the work file moved


# ----------------------------------------------------------------------------- reliability
def _trial_points(path: Path) -> list[tuple[float, float]]:
    study = load(path)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    return [(t.params["alpha"], t.params["beta"]) for t in study.trials]


def test_search_killed_with_sigkill_resumes_to_the_same_outputs(tmp_path, repo_root):
    # SIGKILL from outside at two real points: as the grid pass saves its first chunk of label
    # records (8 chunks of one video each), and as the search prints that its study is
    # stored (the fused rows, heatmap, cache and outputs are still to come)
    ws = build(tmp_path / "ws", videos=8, tile=8,
               ensemble_params=explicit(alpha_grid=SMALL, beta_grid=SMALL, chunk_frames=10))
    out, log = ws["out"], tmp_path / "stdout.txt"

    def search(kill_when=None) -> int:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with log.open("w") as stdout:
            proc = subprocess.Popen([sys.executable, str(repo_root / "pipeline" / "ensemble.py"),
                                     "--search", "--no-progress"], cwd=tmp_path / "ws", env=env,
                                    stdout=stdout, stderr=subprocess.DEVNULL)
            try:
                deadline = time.monotonic() + 300
                while kill_when is not None and proc.poll() is None:
                    if kill_when():
                        os.kill(proc.pid, signal.SIGKILL)
                        break
                    assert time.monotonic() < deadline, "the kill point never came"
                    time.sleep(0.001)
                return proc.wait(timeout=300)
            finally:
                if proc.poll() is None:
                    proc.kill()

    outputs = ("weights.json", "metrics.json", "members.json", "grid_scores.npz", STUDY_FILE)
    # killed in the grid pass: its label records are left behind, nothing else
    assert search(lambda: any(out.glob(f"{RECORDS}*/chunk*.npz"))) == -signal.SIGKILL
    assert list(out.glob(f"{RECORDS}*"))
    assert not any((out / name).exists() for name in outputs)
    # killed once the study is stored (in its work file, beside study.journal), before any
    # output
    assert search(lambda: "study: " in log.read_text()) == -signal.SIGKILL
    work = list(out.glob(f".{STUDY_FILE}.*.tmp"))
    assert len(work) == 1 and len(_trial_points(work[0])) == len(SMALL) ** 2
    assert not any((out / name).exists() for name in outputs)
    assert search() == 0
    assert f"{len(SMALL) ** 2} grid points, 0 new" in log.read_text()  # the study resumed
    clean = ensemble.main(argv({**ws, "out": tmp_path / "clean"}))
    weights = json.loads((out / "weights.json").read_text())
    assert (weights["alpha"], weights["beta"]) == PLANTED and weights["oof_mIoU"] == 1.0
    for key in ("alpha", "beta", "oof_mIoU", "groups", "grid", "fingerprint", "members"):
        assert weights[key] == clean["weights"][key], key
    assert json.loads((out / "metrics.json").read_text()) == clean["metrics"]
    points = _trial_points(out / STUDY_FILE)
    assert sorted(points) == sorted((a, b) for a in SMALL for b in SMALL)  # each exactly once
    assert weights["study"]["trials"] == len(points)
    # the records, the work file and the lock are gone
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


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
        result = search_ensemble(
            oof_root=ws["oof"], data_dir=ws["data"], out_dir=ws["out"], groups=groups,
            alphas=SMALL, betas=SMALL, workers=1, chunk_frames=2, progress=False)
        assert result["metrics"]["frames"] == videos * 10
        assert len(peaks) == 1 + videos and names  # the grid pass, each chunk's fused rows
        return max(peaks)

    for module, name, wrap in ((passes, "score_pass", traced), (passes, "_pass_chunk", collected),
                               (records, "_rows_chunk", lambda fn: traced(collected(fn)))):
        monkeypatch.setattr(module, name, wrap(getattr(module, name)))
    gc.collect()
    gc.freeze()
    try:
        few, many = peak(3, "few"), peak(30, "many")  # 30 and 300 frames of 64 x 48
    finally:
        gc.unfreeze()
    one_map = 3 * 64 * 48 * 4  # float32 [C, H, W]
    assert few > 3 * one_map  # the pass holds a frame's maps...
    assert many < 1.5 * few, (few, many)  # ...but not those of more frames


# ----------------------------------------------------------------------------- members, fallback
def _edit_params(ws, **sections) -> dict:
    """Merge ``sections`` ({section: {key: value}}) into the workspace's params.yaml."""
    params = yaml.safe_load(ws["params"].read_text())
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    ws["params"].write_text(yaml.safe_dump(params))
    return params


def test_members_are_exactly_those_the_params_define(tmp_path, capsys):
    members = {"strong_s0": "S", "weak_s0": "W", "aux_s0": "A", "old_s0": "W", "kd_s0": "W"}
    ws = build(tmp_path, members=members, videos=2, frames=3,
               train={"models": ["strong", "weak", "aux"], "seeds": [0], "students": [],
                      "student_seeds": [0]},
               ensemble_params={"n_strong": 1, "alpha_grid": SMALL, "beta_grid": SMALL})
    _edit_params(ws, models={"old": {"family": "primary"},
                             "kd": {"family": "primary", "distill": {"teacher": "strong"}}})
    capsys.readouterr()
    result = ensemble.main(argv(ws))
    said = [ln for ln in capsys.readouterr().out.splitlines() if "ignoring" in ln]
    assert len(said) == 1 and "kd_s0, old_s0" in said[0] and str(ws["oof"]) in said[0]
    used = {n for names in result["weights"]["fused"]["groups"].values() for n in names}
    assert used == {"strong_s0", "weak_s0", "aux_s0"}
    assert set(json.loads((ws["out"] / "members.json").read_text())) == used
    # the student back in train.students: a member again
    _edit_params(ws, train={"students": [{"name": "kd", "teacher": "strong"}]})
    result = ensemble.main(argv(ws))
    assert "kd_s0" in {n for names in result["weights"]["fused"]["groups"].values() for n in names}
    assert "ignoring the maps of old_s0 " in capsys.readouterr().out
    # members the params define without maps: an error naming them
    _edit_params(ws, train={"seeds": [0, 1]})
    err = _error(capsys, argv(ws))
    assert "oof_preds/aux_s1: no maps of member 'aux_s1'" in err and "kd_s1" not in err
    assert "also missing: strong_s1, weak_s1" in err and "train.models x train.seeds" in err


def test_partial_oof_coverage_is_refused_unless_allowed(tmp_path, capsys):
    ws = build(tmp_path, videos=2, frames=3, ensemble_params=explicit(alpha_grid=SMALL))
    for member in MEMBERS:  # fold 1 never trained: no member has its maps
        shutil.rmtree(run_map_dir(ws["oof"], member, 1))
    err = _error(capsys, argv(ws))
    assert err.startswith(f"error: {ws['folds']}: ") and "cover 3 of its 6 train frames" in err
    assert "fold 1: 3 of its 3" in err and "ensemble.allow_partial: true" in err
    assert not (ws["out"] / "weights.json").exists()
    _edit_params(ws, ensemble={"allow_partial": True})
    capsys.readouterr()
    result = ensemble.main(argv(ws))
    printed = capsys.readouterr().out
    for written in (result["metrics"], json.loads((ws["out"] / "metrics.json").read_text()),
                    json.loads((ws["out"] / "weights.json").read_text())):
        assert (written["oof_frames"], written["oof_frames_missing"], written["partial"],
                written["missing_folds"]) == (3, 3, True, {"1": 3})
    assert "partial: fitted on 3 of the 6 train frames (3 missing: fold 1: 3;" in printed


def _good_or_bad(member: str, gt: np.ndarray) -> np.ndarray:
    """good_*: 0.8 on the true class; bad_*: 0.7 on the next one (the mean of one good and two
    bad members puts 0.5 there and 0.37 on the truth)."""
    good = member.startswith("good")
    truth = np.where(gt == 255, 0, gt).astype(np.intp)
    probs = np.full((3, *gt.shape), 0.1 if good else 0.15, np.float32)
    np.put_along_axis(probs, (truth if good else (truth + 1) % 3)[None], 0.8 if good else 0.7,
                      axis=0)
    return probs


def test_fallback_to_the_best_single_member_when_fusion_is_worse(tmp_path, capsys):
    members = {"good_s0": "S", "bad_s0": "S", "bad_s1": "S"}
    ws = build(tmp_path, members=members, videos=2, frames=3, make_map=_good_or_bad,
               ensemble_params={"n_strong": 10, "alpha_grid": SMALL, "beta_grid": SMALL})
    _edit_params(ws, models={"good": {"family": "primary"}, "bad": {"family": "primary"}})
    capsys.readouterr()
    weights = ensemble.main(argv(ws))["weights"]
    printed = capsys.readouterr().out
    assert ("ensemble.n_strong 10 is more than the 3 members of family 'primary': clamped to 3"
            in printed)
    assert weights["fused"]["groups"] == {"S": ["bad_s0", "bad_s1", "good_s0"], "W": [], "A": []}
    assert weights["fallback"] == "best_single"
    assert weights["groups"] == {"S": ["good_s0"], "W": [], "A": []}
    assert weights["oof_mIoU"] == weights["best_single"]["oof_mIoU"] == 1.0
    assert weights["best_single"]["member"] == "good_s0" and weights["fused"]["oof_mIoU"] < 0.5
    metrics = json.loads((ws["out"] / "metrics.json").read_text())
    assert (metrics["fallback"], metrics["fallback_member"]) == ("best_single", "good_s0")
    assert metrics["S_W_A_mIoU"] == weights["fused"]["oof_mIoU"] < metrics["submitted_mIoU"]
    assert "fallback: the best fused row" in printed and "selects good_s0 alone" in printed
    ensemble.main(argv(ws, "--apply"))
    assert "best single member good_s0" in capsys.readouterr().out
    for i in range(3):  # the member's test argmax
        gt = pattern(2)[0]
        assert np.array_equal(_read_pred(ws, f"v2_{i:02d}"), _good_or_bad("good_s0", gt).argmax(0))
    # fallback: none keeps the fused row, with a warning
    _edit_params(ws, ensemble={"fallback": "none"})
    weights = ensemble.main(argv(ws))["weights"]
    captured = capsys.readouterr()
    assert weights["fallback"] is None and weights["groups"] == weights["fused"]["groups"]
    assert "warning: the best fused row" in captured.err and "good_s0" in captured.err
    _edit_params(ws, ensemble={"fallback": "bset"})
    err = _error(capsys, argv(ws))
    assert "ensemble.fallback" in err and "'bset'" in err and "best_single, none" in err


def test_full_data_run_has_its_own_recorded_test_weight(tmp_path, capsys):
    ws = build(tmp_path, videos=2, frames=3, ensemble_params=explicit(alpha_grid=SMALL,
                                                                      beta_grid=SMALL))
    ensemble.main(argv(ws))
    ensemble.main(argv(ws, "--apply"))
    folds_only = {i: _read_pred(ws, f"v2_{i:02d}") for i in range(3)}
    # a --fold all run of strong_s0 (test maps only) that says class 2 everywhere
    run = run_map_dir(ws["oof"], "strong_s0", "all")
    flat = np.stack([np.full(SHAPE, p, np.float32) for p in (0.1, 0.1, 0.8)])
    for i in range(3):
        write_probs(run / "test" / f"v2_{i:02d}.npz", flat, quant="float16")
    write_run_meta(run, {"member": "strong_s0", "fold": "all", "seed": 0, "classes": 3,
                         "class_names": ["a", "b", "c"], "quant": "float16", "stride": 1,
                         "counts": {"oof": 0, "test": 3}})
    weights = ensemble.main(argv(ws))["weights"]
    members = json.loads((ws["out"] / "members.json").read_text())
    assert weights["full_data_weight"] == 0.0
    for mixes in (weights["members"], members):
        assert mixes["strong_s0"]["test_weights"] == {"f0": 0.5, "f1": 0.5, "fall": 0.0}
        assert mixes["weak_s0"]["test_weights"] == {"f0": 0.5, "f1": 0.5}
    ensemble.main(argv(ws, "--apply"))  # by default the test maps are the fold models' mean
    assert all(np.array_equal(_read_pred(ws, f"v2_{i:02d}"), folds_only[i]) for i in range(3))
    _edit_params(ws, ensemble={"full_data_weight": 1.0})
    weights = ensemble.main(argv(ws))["weights"]
    assert weights["members"]["strong_s0"]["test_weights"] == {"f0": 0.0, "f1": 0.0, "fall": 1.0}
    ensemble.main(argv(ws, "--apply"))
    by_name = {m.name: m for m in list_members(ws["oof"])}
    for i in range(3):
        fid = f"v2_{i:02d}"
        groups = {g: [by_name[n].read_test(fid, folds=["all"] if n == "strong_s0" else [0, 1])
                      for n in sorted(MEMBERS) if MEMBERS[n] == g] for g in fusion.GROUPS}
        expected = fusion.fuse_labels(*(fusion.group_mean(groups[g]) for g in fusion.GROUPS),
                                      alpha=weights["alpha"], beta=weights["beta"])
        assert np.array_equal(_read_pred(ws, fid), expected)
    assert not np.array_equal(_read_pred(ws, "v2_00"), folds_only[0])
    _edit_params(ws, ensemble={"full_data_weight": 1.5})
    assert "ensemble.full_data_weight must be a number in [0, 1]" in _error(capsys, argv(ws))


def test_class_names_are_compared_with_classes_json(tmp_path, capsys):
    ws = build(tmp_path, videos=2, frames=3, ensemble_params=explicit(alpha_grid=SMALL))
    meta = run_map_dir(ws["oof"], "weak_s0", 1) / "meta.json"
    doc = json.loads(meta.read_text())
    meta.write_text(json.dumps({**doc, "class_names": ["a", "c", "b"]}))
    err = _error(capsys, argv(ws))
    assert f"{meta}: member 'weak_s0'" in err and "class 1 = 'c'" in err and "has 'b'" in err
    meta.write_text(json.dumps({k: v for k, v in doc.items() if k != "class_names"}))
    err = _error(capsys, argv(ws))
    assert f"{meta}: no class_names" in err and "weak_s0" in err


def test_non_finite_weights_are_refused(searched, capsys):
    ws, _ = searched
    path = ws["out"] / "weights.json"
    weights = json.loads(path.read_text())
    for bad in ({"alpha": float("nan")}, {"beta": float("inf")}):
        path.write_text(json.dumps({**weights, **bad}))  # NaN / Infinity literals
        err = _error(capsys, argv(ws, "--apply"))
        assert str(path) in err and "must be finite" in err
    mix = {"f0": float("nan"), "f1": 0.5}
    path.write_text(json.dumps({**weights, "members": {
        **weights["members"], "weak_s0": {**weights["members"]["weak_s0"], "test_weights": mix}}}))
    assert "test_weights of member 'weak_s0'" in _error(capsys, argv(ws, "--apply"))


def test_one_search_at_a_time(searched, capsys, repo_root):
    ws, _ = searched
    with search_lock(ws["out"]) as lock:
        holder = lock.read_text().strip()
        assert holder.startswith(f"pid {os.getpid()}, started ")
        err = _error(capsys, argv(ws))
        assert err == (f"error: {lock}: another search is writing {ws['out']} ({holder}); "
                       f"wait for it to end")
        done = subprocess.run([sys.executable, str(repo_root / "pipeline" / "ensemble.py"),
                               *argv(ws)], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert done.stderr.strip().splitlines()[-1] == err
    assert not lock.exists()  # released: the next search runs
    ensemble.main(argv(ws))


def test_a_study_another_process_reads_or_writes_is_neither_an_error_nor_deleted(
        searched, monkeypatch):
    # Optuna's journal takes no lock to read: a tool or dashboard reading the study never
    # stops a search (SQLite's "locked by another process" is gone). A writer holds the lock
    # file <file>.lock (a symlink) for one append: a search of the same inputs finds the study
    # complete and writes nothing, so it neither waits for that lock nor touches it
    try:
        from optuna.storages.journal import JournalFileSymlinkLock
    except ImportError:  # optuna < 4.0
        from optuna.storages import JournalFileSymlinkLock

    ws, first = searched
    path = ws["out"] / STUDY_FILE
    kept = path.read_bytes()
    lock = Path(f"{path}.lock")
    os.symlink(path, lock)  # as JournalFileSymlinkLock holds it while another process appends

    def acquire(self):
        raise AssertionError("the search waited for the journal's lock")

    monkeypatch.setattr(JournalFileSymlinkLock, "acquire", acquire)
    with path.open("rb"):  # and a reader holding the file open
        again = ensemble.main(argv(ws))
    assert again["weights"] == first["weights"] and path.read_bytes() == kept
    assert lock.is_symlink()  # another process's lock: left alone


def test_leftovers_of_killed_searches_are_removed_but_the_resumed_work_file(tmp_path):
    # the search lock is held: a journal lock on a work file is a killed search's (it would
    # stall the resumed search for Optuna's 30 s grace period); other inputs' work files go
    file = tmp_path / STUDY_FILE
    ours, other = work_path(file, "a" * 64), work_path(file, "b" * 64)
    for work in (ours, other):
        work.write_bytes(b"")
        os.symlink(work, f"{work}.lock")
    Path(f"{ours}.lock{'0' * 32}.rename").write_bytes(b"")
    file.write_bytes(b"")
    os.symlink(file, f"{file}.lock")  # the kept study's lock may be another process's: kept
    remove_leftovers(tmp_path, file=file, fingerprint="a" * 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [ours.name, file.name, f"{file.name}.lock"])
