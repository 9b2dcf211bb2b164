"""The report says on how many OOF frames the ensemble was fitted and whether they were sampled
(infer.oof_sample), and marks members' TTA scores made on a sample."""

from __future__ import annotations

from pipeline.reporting.summary import format_summary

SAMPLE = {"windows": 2, "length": 16, "every_nth_video": 4, "seed": 0}


def summary(sampled: bool) -> dict:
    member = {"member": "m_s0", "family": "primary", "group": "S", "folds": [0, 1],
              "last_mIoU": 0.5, "last_folds": 2, "swa_mIoU": 0.52, "swa_folds": 2,
              "swa_single_mIoU": 0.53, "swa_tta_mIoU": 0.55, "tta_folds": 2,
              "oof_sampled": sampled}
    ensemble = {"rows": {"S_W_A": {"mIoU": 0.6, "mVC8": 0.8, "mVC16": 0.7}}, "alpha": 1.0,
                "beta": 0.4, "frames": 96, "oof_sampled": sampled,
                "oof_sample": SAMPLE if sampled else None}
    return {"members": [member], "ensemble": ensemble, "submission": None, "figures": [],
            "notes": []}


def test_the_report_prints_the_fitted_frames_and_the_sample():
    text = format_summary(summary(True))
    assert f"Fitted on 96 OOF frames, sampled by infer.oof_sample {SAMPLE}" in text
    assert "| 53.00 * | 55.00 * |" in text and "* on the infer.oof_sample frames only" in text
    plain = format_summary(summary(False))
    assert "Fitted on 96 OOF frames (not sampled)." in plain and " * |" not in plain
