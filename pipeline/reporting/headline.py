"""The workspace's headline: the few numbers a competitor compares between experiments.

The chain writes about thirty metrics files (one per run and stage), and ``dvc exp show`` opens
with some two hundred columns. The report stage also writes one small top-level
``metrics.json`` (:data:`~pipeline.core.names.HEADLINE_FILE`, declared as DVC metrics), so that
``dvc exp show --only-changed`` and ``dvc metrics diff`` compare what matters:

* ``cv_miou``: the out-of-fold mIoU of what was submitted (the fused S_W_A row at its fitted
  weights, or the best single member after the ensemble's fallback), over ``cv_frames``;
* ``cv_mvc8``: that row's video consistency over 8 frames, out of fold;
* ``best_single_cv_miou``: the best single member's, out of fold (the ensemble's gain is the
  difference);
* ``test_miou`` / ``test_mvc8``: the submission zip's scores on a labelled test split (absent
  when the test split has no labels, never a made-up 0).

Every value is copied from the file that computed it (``ensemble/metrics.json``, the zip's
``.eval.json``), in its units (fractions in [0, 1]); nothing is recomputed here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from pipeline.core import atomic
from pipeline.core.names import BEST_SINGLE, EVAL_SUFFIX, HEADLINE_FILE, METRICS_FILE
from pipeline.reporting.runs import read_json

FUSED_ROW = "S_W_A"   # the row the ensemble submits unless it falls back to the best single


def headline(*, ensemble: Mapping[str, Any] | None,
             evaluation: Mapping[str, Any] | None) -> dict[str, Any]:
    """The headline from the ensemble's ``metrics.json`` and the zip's evaluation (either may
    be None: its keys are then left out)."""
    out: dict[str, Any] = {}
    if ensemble:
        row = BEST_SINGLE if ensemble.get("fallback") else FUSED_ROW
        out.update(cv_miou=ensemble.get("submitted_mIoU", ensemble.get(f"{row}_mIoU")),
                   cv_mvc8=ensemble.get(f"{row}_mVC8"),
                   best_single_cv_miou=ensemble.get(f"{BEST_SINGLE}_mIoU"),
                   cv_row=row, cv_frames=ensemble.get("frames"))
    if evaluation and evaluation.get("mIoU") is not None:
        out.update(test_miou=evaluation.get("mIoU"), test_mvc8=evaluation.get("mVC8"),
                   test_frames=evaluation.get("frames"))
    return {key: value for key, value in out.items() if value is not None}


def write_headline(path: str | Path = HEADLINE_FILE, *, ensemble_dir: str | Path,
                   submissions_dir: str | Path, name: str) -> dict[str, Any]:
    """Write :func:`headline` of ``ensemble_dir`` and ``<submissions_dir>/<name>.zip`` to
    ``path`` (atomically) and return it."""
    ensemble = read_json(Path(ensemble_dir) / METRICS_FILE)
    evaluation = read_json(Path(submissions_dir) / f"{name}.zip{EVAL_SUFFIX}")
    doc = headline(ensemble=ensemble, evaluation=evaluation)
    atomic.write_json(Path(path), doc)
    return doc
