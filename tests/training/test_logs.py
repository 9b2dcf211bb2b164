"""Tests for pipeline/training/logs.py: a run's curves through DVCLive, resumed after a cut."""

from __future__ import annotations

import json

from pipeline.core.curves import STEP, SUMMARY_FILE, TRAIN, VAL, cut_curves, read_group
from pipeline.training.logs import CurveLog


def test_curves_are_written_by_dvclive_and_read_back_per_group(tmp_path):
    live_dir = tmp_path / "run" / "dvclive"
    with CurveLog(live_dir) as log:
        for step in (1, 2, 3, 4):
            log.log(TRAIN, step=step, values={"loss": 1.0 / step, "lr": 0.01})
        log.log(VAL, step=4, values={"miou": 0.25})
    train, val = read_group(live_dir, TRAIN), read_group(live_dir, VAL)
    assert train["iter"].tolist() == [1, 2, 3, 4] and train["loss"].tolist() == [1.0, 0.5, 1 / 3, 0.25]
    assert val["iter"].tolist() == [4] and val["miou"].tolist() == [0.25]
    summary = json.loads((live_dir / SUMMARY_FILE).read_text())
    assert summary[TRAIN]["loss"] == 0.25 and summary[VAL]["miou"] == 0.25 and summary[STEP] == 4
    # a logger only: no dvc.yaml of its own, no report, nothing beside the curves folder
    assert not list(tmp_path.rglob("dvc.yaml")) and not list(live_dir.glob("report.*"))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["dvclive"]


def test_a_resumed_run_cut_back_logs_each_step_once(tmp_path):
    live_dir = tmp_path / "dvclive"
    with CurveLog(live_dir) as log:
        for step in range(1, 7):  # killed after step 6; its last checkpoint was step 4
            log.log(TRAIN, step=step, values={"loss": float(step)})
    cut_curves(live_dir, upto=4)
    with CurveLog(live_dir) as log:
        for step in (5, 6, 7, 8):
            log.log(TRAIN, step=step, values={"loss": 10.0 * step})
    train = read_group(live_dir, TRAIN)
    assert train["iter"].tolist() == list(range(1, 9))
    assert train["loss"].tolist() == [1, 2, 3, 4, 50, 60, 70, 80]
