"""The ``train:`` section: which runs exist, and the checks on students and their seeds."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.core.errors import PipelineError
from pipeline.core.runs import load_train_params
from pipeline.launch.lanes import member_targets

from conftest import REPO  # the repository root, defined once


def _write(tmp_path: Path, **train) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update(train)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_students_train_with_their_own_seed_list(tmp_path):
    train = load_train_params(_write(tmp_path, seeds=[0, 1, 2], student_seeds=[2]))
    teachers, pupils = member_targets(models=train.models, students=train.students,
                                      folds=train.folds, seeds=train.seeds,
                                      student_seeds=train.student_seeds)
    assert len(teachers) == len(train.models) * len(train.folds) * 3
    assert len(pupils) == len(train.students) * len(train.folds) * 1
    assert {chain[0].rsplit("-", 1)[1] for chain in pupils} == {"2"}


def test_a_student_seed_without_a_teacher_run_is_an_error(tmp_path):
    with pytest.raises(PipelineError, match=r"student_seeds \[5\] not in train.seeds \[0, 1\].*"
                                            r"unet_r10_kd"):
        load_train_params(_write(tmp_path, seeds=[0, 1], student_seeds=[0, 5]))


def test_a_fixed_teacher_seed_allows_any_student_seed(tmp_path):
    path = _write(tmp_path, seeds=[0, 1], student_seeds=[7])
    params = yaml.safe_load(path.read_text())
    params["models"]["unet_r10_kd"]["distill"]["teacher_seed"] = 0
    path.write_text(yaml.safe_dump(params))
    assert load_train_params(path).student_seeds == [7]


def test_students_need_at_least_one_seed(tmp_path):
    with pytest.raises(PipelineError, match="student_seeds is empty"):
        load_train_params(_write(tmp_path, student_seeds=[]))
    assert load_train_params(_write(tmp_path, students=[], student_seeds=[])).students == []


def test_final_weights_take_swa_then_ema_then_best_then_last(tmp_path):
    from pipeline.core.runs import RunPaths

    paths = RunPaths(tmp_path / "unet_f0_s0")
    with pytest.raises(PipelineError, match="no finished training run"):
        paths.final_weights()
    paths.train_dir.mkdir(parents=True)
    order = [paths.last, paths.best, paths.ema, paths.swa]
    for path in order:
        path.write_bytes(b"weights")
        assert paths.final_weights() == path == paths.final_weights("auto")
    for choice, path in (("swa", paths.swa), ("ema", paths.ema), ("best", paths.best),
                         ("last", paths.last)):
        assert paths.final_weights(choice) == path
    paths.ema.unlink()
    with pytest.raises(PipelineError, match=r"ema\.pt: no ema weights for this run") as err:
        paths.final_weights("ema")  # chosen explicitly: never another file instead
    assert "\n" not in str(err.value)
    with pytest.raises(PipelineError, match="valid: auto, best, ema, last, swa"):
        paths.final_weights("average")
