"""Tests for pipeline/parallel.py: the stage names it runs exist in dvc.yaml, lanes' env."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.parallel import lane_env, main, member_targets
from pipeline.runs import load_train_params

REPO = Path(__file__).resolve().parents[1]


def test_member_chains_name_dvc_stages_in_dependency_order(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update(models=["unet_r10", "fpn_r10"], seeds=[0, 3],
                           student_seeds=[3], folds=[0, 1])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    train = load_train_params(tmp_path / "params.yaml")
    teachers, pupils = member_targets(models=train.models, students=train.students,
                                      folds=train.folds, seeds=train.seeds,
                                      student_seeds=train.student_seeds)
    assert len(teachers) == 2 * 2 * 2 and len(pupils) == len(train.students) * 2 * 1
    assert teachers[0] == ["train@unet_r10-0-0", "swa@unet_r10-0-0", "infer@unet_r10-0-0"]
    assert pupils[0] == ["students@student0-0-3", "swa_students@student0-0-3",
                         "infer_students@student0-0-3"]
    # the names are the ones DVC gives the matrix members of this repository's dvc.yaml
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    listed = subprocess.run([sys.executable, "-m", "dvc", "stage", "list", "--name-only"],
                            cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split()
    for chain in teachers + pupils:
        assert set(chain) <= set(listed), set(chain) - set(listed)


def test_lanes_share_the_cores_or_take_one_gpu_each(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert lane_env(1, jobs=2, gpus=[], cores=8)["OMP_NUM_THREADS"] == "4"
    assert lane_env(0, jobs=4, gpus=[], cores=2)["OMP_NUM_THREADS"] == "1"
    assert [lane_env(k, jobs=2, gpus=["2", "5"], cores=8)["CUDA_VISIBLE_DEVICES"]
            for k in range(2)] == ["2", "5"]


def test_dry_run_prints_every_stage_once(capsys):
    main(["--dry-run", "--params", str(REPO / "params.yaml")])
    out = capsys.readouterr().out
    train = load_train_params(REPO / "params.yaml")
    teachers, pupils = member_targets(models=train.models, students=train.students,
                                      folds=train.folds, seeds=train.seeds,
                                      student_seeds=train.student_seeds)
    for chain in teachers + pupils:  # one dvc process per member, its stages in order
        assert out.count(f"repro -s {' '.join(chain)}\n") == 1
    assert out.index("repro folds") < out.index("repro -s train@") < out.index("repro -s students@")
    assert out.rstrip().endswith("dvc repro")
