"""Test-split scores of every member and ensemble row (``ensemble.py --apply`` on a labelled
test split): the numbers are those of the maps and the OOF-fitted weights, the submitted row is
what test_pred holds, and an unlabelled test split scores nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipeline import ensemble
from pipeline.data.manifest import read_manifest, write_manifest
from pipeline.ensembling import fusion
from pipeline.ensembling.holdout import TEST_SCORES
from pipeline.evaluation.metrics import confusion_matrix, mean_iou

from test_ensemble import MEMBERS, PLANTED, SMALL, argv, build, explicit, pattern

TEST_IDS = [f"v4_{i:02d}" for i in range(10)]


def _miou(labels_of) -> float:
    gt, _ = pattern(4)
    cm = sum(confusion_matrix(gt, labels_of(i).astype(np.uint8), num_classes=3)
             for i in TEST_IDS)
    return mean_iou(cm)


def test_members_and_rows_on_the_labelled_test_split(tmp_path, capsys):
    ws = build(tmp_path, ensemble_params=explicit(alpha_grid=SMALL, beta_grid=SMALL))
    ensemble.main(argv(ws))
    ensemble.main(argv(ws, "--apply"))
    scores = json.loads((ws["out"] / TEST_SCORES).read_text())
    assert scores["labelled_frames"] == scores["test_frames"] == 10
    assert "TP+FP+FN" in scores["miou_definition"]
    _, maps = pattern(4)  # every member of a group holds its group's map on every test frame
    for member, group in MEMBERS.items():
        assert scores["members"][member]["tta"] == pytest.approx(_miou(lambda i: maps[group].argmax(0)))
    rows = scores["rows"]
    assert rows["S_W_A"] == 1.0  # the planted weights get every labelled test pixel right
    assert rows["S"] == pytest.approx(_miou(lambda i: maps["S"].argmax(0))) and rows["S"] < 1.0
    uniform = (2 * maps["S"] + 2 * maps["W"] + maps["A"]) / 5
    assert rows["uniform_mean"] == pytest.approx(_miou(lambda i: uniform.argmax(0)))
    weights = json.loads((ws["out"] / "weights.json").read_text())
    assert (weights["alpha"], weights["beta"]) == PLANTED and not weights["fallback"]
    alpha_sw = json.loads((ws["out"] / "metrics.json").read_text())["alpha_S_W"]
    s_w = fusion.fuse_labels(maps["S"], maps["W"], None, alpha=alpha_sw, beta=0.0)
    assert rows["S_W"] == pytest.approx(_miou(lambda i: s_w))
    # the submitted row is what --apply wrote
    written = _miou(lambda i: np.asarray(Image.open(ws["out"] / "test_pred" / f"{i}.png")))
    assert rows["submitted"] == pytest.approx(written) == rows["S_W_A"]
    assert "submitted mIoU 100.00" in capsys.readouterr().out


def test_an_unlabelled_test_split_scores_nothing(tmp_path):
    ws = build(tmp_path, members={"strong_s0": "S", "aux_s0": "A"},
               ensemble_params=explicit(alpha_grid=SMALL, beta_grid=SMALL) | {
                   "groups": {"S": ["strong_s0"], "W": [], "A": ["aux_s0"]}})
    frames = read_manifest(ws["data"] / "manifest.csv")
    write_manifest(ws["data"] / "manifest.csv",
                   [f if f.split == "train" else type(f)(**{**f.__dict__, "mask": None})
                    for f in frames])
    ensemble.main(argv(ws))
    ensemble.main(argv(ws, "--apply"))
    scores = json.loads((ws["out"] / TEST_SCORES).read_text())
    assert scores["labelled_frames"] == 0 and scores["test_frames"] == 10
    assert scores["members"] == {} and scores["rows"] == {}
