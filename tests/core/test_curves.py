"""Tests for pipeline/core/curves.py: DVCLive's curve files, read back, tailed and cut."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.curves import (STEP, SUMMARY_FILE, TRAIN, VAL, curve_path, cut_curves, last_value,
                                  read_curve, read_group)
from pipeline.core.errors import PipelineError


def write_curve(live_dir: Path, group: str, name: str, rows: list[tuple[int, float]]) -> Path:
    """A curve as DVCLive writes it (``step<TAB>name`` rows); for suites that need one."""
    path = curve_path(live_dir, group, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{STEP}\t{name}\n" + "".join(f"{s}\t{v}\n" for s, v in rows))
    return path


def test_a_group_is_one_table_on_the_union_of_its_steps(tmp_path):
    write_curve(tmp_path, TRAIN, "loss", [(1, 2.0), (2, 1.5), (3, 1.0)])
    write_curve(tmp_path, TRAIN, "skipped_steps", [(2, 0), (3, 1)])
    table = read_group(tmp_path, TRAIN)
    assert table["iter"].tolist() == [1, 2, 3] and table["loss"].tolist() == [2.0, 1.5, 1.0]
    assert math.isnan(table["skipped_steps"][0]) and table["skipped_steps"][1:].tolist() == [0, 1]
    assert read_group(tmp_path, VAL) is None and read_curve(tmp_path / "none.tsv") is None


def test_a_file_that_is_not_a_curve_is_an_error_naming_it(tmp_path):
    path = curve_path(tmp_path, VAL, "miou")
    path.parent.mkdir(parents=True)
    path.write_text("iter,miou\n1,0.5\n")
    with pytest.raises(PipelineError, match=f"{path}: not a DVCLive curve"):
        read_group(tmp_path, VAL)
    path.write_text("step\tmiou\n1\tbad\n")
    with pytest.raises(PipelineError, match="non-numeric"):
        read_curve(path)


def test_last_value_skips_a_partly_written_line(tmp_path):
    path = curve_path(tmp_path, VAL, "miou")
    assert last_value(path) is None
    path.parent.mkdir(parents=True)
    path.write_text("step\tmiou\n")
    assert last_value(path) is None
    path.write_text("step\tmiou\n10\t0.5\n20\t0.6\n30")  # the writer is mid-line
    assert last_value(path) == (20, 0.6)
    path.write_text("step\tmiou\n" + "".join(f"{s}\t0.{s}\n" for s in range(1, 2000)))
    assert last_value(path) == (1999, 0.1999)  # only the tail is read


def test_cut_keeps_steps_up_to_the_resumed_iteration_and_rebuilds_the_summary(tmp_path):
    loss = write_curve(tmp_path, TRAIN, "loss", [(s, 1.0 / s) for s in range(1, 11)])
    miou = write_curve(tmp_path, VAL, "miou", [(4, 0.2), (8, 0.4)])
    with loss.open("a") as fh:
        fh.write("11\t0.0")  # a row cut short by a kill
    cut_curves(tmp_path, upto=6)
    assert read_curve(loss)[0].tolist() == [1, 2, 3, 4, 5, 6]
    assert read_curve(miou)[0].tolist() == [4]
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert summary == {TRAIN: {"loss": pytest.approx(1 / 6)}, VAL: {"miou": 0.2}, STEP: 6}
    before = {p: p.read_bytes() for p in (loss, miou)}
    cut_curves(tmp_path, upto=6)  # nothing after 6 any more: the files stay byte for byte
    assert all(p.read_bytes() == b for p, b in before.items())
    cut_curves(tmp_path / "absent", upto=3)  # a run without curves yet: nothing to do
    assert not (tmp_path / "absent").exists()
    assert np.isfinite(read_group(tmp_path, TRAIN)["loss"]).all()
