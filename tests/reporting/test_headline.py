"""Tests for pipeline/reporting/headline.py: the headline copies the submitted row's scores."""

from __future__ import annotations

import json

from pipeline.core.names import HEADLINE_FILE
from pipeline.reporting.headline import headline, write_headline

ENSEMBLE = {"frames": 120, "best_single_mIoU": 0.41, "best_single_mVC8": 0.80,
            "S_W_A_mIoU": 0.45, "S_W_A_mVC8": 0.86, "fallback": None, "submitted_mIoU": 0.45}


def test_a_fused_submission_heads_with_the_fused_row():
    head = headline(ensemble=ENSEMBLE, evaluation={"mIoU": 0.39, "mVC8": 0.84, "frames": 30})
    assert head == {"cv_miou": 0.45, "cv_mvc8": 0.86, "best_single_cv_miou": 0.41,
                    "cv_row": "S_W_A", "cv_frames": 120, "test_miou": 0.39, "test_mvc8": 0.84,
                    "test_frames": 30}


def test_after_the_fallback_the_headline_is_the_best_single_member():
    ens = dict(ENSEMBLE, fallback="best_single", submitted_mIoU=0.41, S_W_A_mIoU=0.40)
    head = headline(ensemble=ens, evaluation=None)
    assert head["cv_row"] == "best_single"
    assert head["cv_miou"] == head["best_single_cv_miou"] == 0.41
    assert head["cv_mvc8"] == 0.80


def test_an_unlabelled_test_split_leaves_the_test_keys_out_not_zero():
    head = headline(ensemble=ENSEMBLE, evaluation={"mIoU": None, "frames": 0})
    assert not any(key.startswith("test_") for key in head)
    assert headline(ensemble=None, evaluation=None) == {}


def test_write_headline_reads_the_stage_files(tmp_path):
    (tmp_path / "ensemble").mkdir()
    (tmp_path / "subs").mkdir()
    (tmp_path / "ensemble" / "metrics.json").write_text(json.dumps(ENSEMBLE))
    (tmp_path / "subs" / "sub.zip.eval.json").write_text(json.dumps({"mIoU": 0.3, "mVC8": 0.7}))
    out = tmp_path / HEADLINE_FILE
    doc = write_headline(out, ensemble_dir=tmp_path / "ensemble",
                         submissions_dir=tmp_path / "subs", name="sub")
    assert json.loads(out.read_text()) == doc
    assert doc["cv_miou"] == 0.45 and doc["test_miou"] == 0.3
