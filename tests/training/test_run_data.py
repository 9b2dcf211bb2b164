"""A run's frames and prior (pipeline.training.run_data.load_run_data)."""

from __future__ import annotations

import pytest

from pipeline.training.run_data import load_run_data

from test_loop import _data


def test_training_frames_without_a_labelled_pixel_are_refused(demo_workspace, tmp_path):
    from pipeline.core.errors import PipelineError
    from pipeline.data.manifest import read_class_counts, write_class_counts

    ws = demo_workspace
    ids, counts = read_class_counts(ws.counts)
    train = {f.id for f in _data(ws, 0).train_frames}
    counts[[k for k, i in enumerate(ids) if i in train]] = 0
    void = tmp_path / "class_counts.npz"
    write_class_counts(void, ids, counts)
    with pytest.raises(PipelineError, match=rf"{void}: the {len(train)} training frame\(s\) of "
                                            r"--fold 0 have no labelled pixel \(all void\)"):
        load_run_data(manifest=ws.manifest, classes_path=ws.classes, counts_path=void,
                      folds_path=ws.folds, fold=0)
    assert load_run_data(manifest=ws.manifest, classes_path=ws.classes, counts_path=void,
                         folds_path=ws.folds, fold=1).prior_counts.sum() > 0

