"""The whole chain, end to end, in a temporary copy of the repository with tiny params.

The copy keeps the repository's params.yaml and shrinks it (fewer, smaller frames, tiny
models, a few iterations) without changing its shape: every model config, the student, the
auxiliary family, TTA and the ensemble search stay in, so a broken stage or key fails here.
The members are built side by side by ``pipeline/parallel.py`` (which ends with a plain
``dvc repro``); a second ``dvc repro`` must then find nothing to do.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from pipeline.data.manifest import read_manifest

from conftest import REPO  # the repository root, defined once

TINY_ENCODER = {"arch": "Unet", "encoder": "tu-test_resnet",
                "arch_kwargs": {"decoder_channels": [16, 16, 8, 8, 8]}}


def tiny_params(params: dict) -> dict:
    """The repository's params, shrunk to run in about a minute on a CPU."""
    p = json.loads(json.dumps(params))
    p["prepare"].update(dataset="demo", workers=1)
    p["prepare"]["demo"].update(videos=6, test_videos=2, min_frames=5, max_frames=6,
                                height=32, width=48)
    p["folds"]["n_folds"] = 2
    p["train"].update(folds=[0, 1], seeds=[0], student_seeds=[0], num_workers=0)
    for name, cfg in p["models"].items():
        cfg.update(TINY_ENCODER, batch_size=4, iters=4, val_interval=4)
        cfg["augment"] = {**cfg.get("augment", {}), "crop": [32, 32]}
        cfg.setdefault("schedule", {})["warmup_iters"] = 1
        if cfg.get("swa"):
            cfg["swa"].update(iters=4, interval=2)
        for loss in cfg.get("loss", []):
            if "min_kept" in loss:
                loss["min_kept"] = 1000
    p["infer"]["tta"].update(scales=[1.0, 1.25], flip=True)
    p["ensemble"].update(alpha_grid=[0.0, 0.5, 1.0], beta_grid=[0.0, 0.5], workers=1)
    p["submit"]["previews"] = 2
    return p


def copy_repo(dest: Path) -> None:
    """The tracked files of the repository (the working tree's versions)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for name in ("pipeline", "tests"):  # new modules not yet tracked
        for src in (REPO / name).rglob("*.py"):
            target = dest / src.relative_to(REPO)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)
    (dest / "dvc.lock").unlink(missing_ok=True)


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def build_chain(work: Path, cmd: list[str]) -> Path:
    """A tiny copy of the repository at ``work``, built from nothing by ``cmd``."""
    if shutil.which("git") is None:
        pytest.skip("git is needed to copy the repository")
    copy_repo(work)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (work / "params.yaml").write_text(yaml.safe_dump(tiny_params(params), sort_keys=False))
    for git in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        assert run(git, work).returncode == 0
    first = run(cmd, work)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return work


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    """Members side by side (pipeline/parallel.py, 2 lanes), then ``dvc repro``."""
    return build_chain(tmp_path_factory.mktemp("repo"),
                       [sys.executable, "pipeline/parallel.py", "--jobs", "2"])


@pytest.fixture(scope="module")
def chain_again(tmp_path_factory) -> Path:
    """The same params built a second time, by a plain ``dvc repro``."""
    return build_chain(tmp_path_factory.mktemp("repo_again"), [sys.executable, "-m", "dvc", "repro"])


def test_chain_yields_a_valid_submission_and_metrics(chain):
    params = yaml.safe_load((chain / "params.yaml").read_text())
    name = params["submit"]["name"]
    test_frames = [f for f in read_manifest(chain / "data" / "manifest.csv") if f.split == "test"]
    with zipfile.ZipFile(chain / "submissions" / f"{name}.zip") as zf:
        assert zf.testzip() is None
        assert sorted(Path(n).stem for n in zf.namelist()) == sorted(f.id for f in test_frames)
    manifest = json.loads((chain / "submissions" / f"{name}.json").read_text())
    assert manifest["frames"] == len(test_frames)
    score = json.loads((chain / "submissions" / f"{name}.zip.eval.json").read_text())
    assert 0.0 <= score["mIoU"] <= 1.0
    metrics = json.loads((chain / "ensemble" / "metrics.json").read_text())
    train = params["train"]
    members = (len(train["models"]) * len(train["seeds"])
               + len(train["students"]) * len(train["student_seeds"]))
    assert metrics["members"] == members
    weights = json.loads((chain / "ensemble" / "weights.json").read_text())
    # the fitted row has S and A members (the submitted one may be the best single member)
    assert weights["fused"]["groups"]["S"] and weights["fused"]["groups"]["A"]
    for model in train["models"] + [s["name"] for s in train["students"]]:
        for fold in train["folds"]:
            run_dir = chain / "runs" / f"{model}_f{fold}_s0"
            for name_ in ("metrics.json", "swa_metrics.json", "infer_metrics.json", "swa.pt"):
                assert (run_dir / name_).is_file(), run_dir / name_
    summary = json.loads((chain / "reports" / "summary.json").read_text())
    assert summary and (chain / "reports" / "summary.md").is_file()
    assert sorted(p.name for p in (chain / "reports").glob("*.png"))
    shown = run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], chain)
    assert shown.returncode == 0 and "S_W_A_mIoU" in shown.stdout
    # the headline copies what was submitted and scored, and DVC lists it as a metric
    head = json.loads((chain / "metrics.json").read_text())
    assert head["cv_miou"] == metrics["submitted_mIoU"] and head["test_miou"] == score["mIoU"]
    assert head["best_single_cv_miou"] == metrics["best_single_mIoU"] <= head["cv_miou"]
    assert '"cv_miou"' in shown.stdout


def test_second_repro_is_a_no_op(chain):
    again = run([sys.executable, "-m", "dvc", "repro"], chain)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "Data and pipelines are up to date." in again.stdout
    assert "Running stage" not in again.stdout


def test_two_builds_give_identical_data_folds_and_zip(chain, chain_again):
    """Determinism on the CPU (one thread per process, as here): the same params give the same
    manifest, folds and submission bytes, whether members ran side by side or in turn; the
    training metrics agree to float rounding."""
    for name in ("data/manifest.csv", "data/classes.json", "folds/folds.csv",
                 "submissions/submission.zip", "ensemble/weights.json"):
        a, b = (chain / name).read_bytes(), (chain_again / name).read_bytes()
        if name.endswith("weights.json"):  # the input fingerprint holds file times, the
            a, b = (json.loads(x) for x in (a, b))  # study its storage path: both per copy
            for w in (a, b):
                w.pop("study")
                w.pop("fingerprint")
        assert a == b, name
    for metrics in sorted(chain.glob("runs/*/metrics.json")):
        x = json.loads(metrics.read_text())
        y = json.loads((chain_again / metrics.relative_to(chain)).read_text())
        assert abs(x["last_miou"] - y["last_miou"]) <= 1e-6, metrics
