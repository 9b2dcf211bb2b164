"""What a run learned from (pipeline.training.provenance): a teacher that has seen the
student's validation frames is refused; a run starts over when its folds, frames or teacher
change."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.runs import RunPaths
from pipeline.models.checkpoint import model_from_checkpoint
from pipeline.training import provenance
from pipeline.training.loop import train_run
from pipeline.training.run_data import load_run_data

from test_loop import CPU, _cfg, _data, _iters, _train


# ----------------------------------------------------------------------------- teacher folds
def test_a_teacher_that_has_seen_the_student_validation_frames_is_refused(demo_workspace):
    from pipeline.core.errors import PipelineError

    ws = demo_workspace
    digests = provenance.data_digests(_data(ws, 0))
    ok = {"fold": 0, "config": {"data": digests}}
    provenance.check_teacher(ok, "t.pt", student="kd", fold=0, digests=digests)
    provenance.check_teacher({"fold": 1}, "t.pt", student="kd", fold="all", digests=digests)
    for ckpt, says in (({"fold": 1}, "fold 1 held out"), ({"fold": "all"}, "fold all held out"),
                       ({"fold": None}, "an unrecorded fold held out")):
        with pytest.raises(PipelineError) as err:
            provenance.check_teacher(ckpt, "t.pt", student="kd", fold=0, digests=digests)
        assert str(err.value).startswith("models.kd.distill.teacher: teacher t.pt was trained "
                                         f"with {says}, but the student holds out fold 0")
    other = {"fold": 0, "config": {"data": provenance.data_digests(_data(ws, 1))}}
    with pytest.raises(PipelineError, match="fold 0 of another fold assignment"):
        provenance.check_teacher(other, "t.pt", student="kd", fold=0, digests=digests)


# ----------------------------------------------------------------------------- what a run learned from
def _swap_a_video(ws, tmp_path):
    """folds.csv with the first video of fold 1 moved to fold 0."""
    lines = ws.folds.read_text().splitlines()
    moved = next(ln.split(",")[1] for ln in lines[1:] if ln.endswith(",1"))
    path = tmp_path / "folds.csv"
    path.write_text("\n".join(lines[:1] + [ln[:-1] + "0" if ln.split(",")[1] == moved else ln
                                           for ln in lines[1:]]) + "\n")
    return path


def test_a_run_starts_over_when_its_folds_or_frames_change(demo_workspace, tmp_path, capsys):
    """Without logit adjustment (whose prior, part of the config, also changes with the data)."""
    import shutil

    from pipeline.data.manifest import read_manifest, write_manifest

    ws = demo_workspace
    cfg = _cfg(ws, iters=4, val_interval=4, ckpt_interval=2, swa={"iters": 0})
    assert not cfg.logit_adjust.enabled
    runs = tmp_path / "runs"
    paths, _ = _train(ws, cfg, runs)
    capsys.readouterr()

    # a copy of the data whose manifest predates the digest column: the files are hashed
    # instead, to the same digests, so the finished run is resumed (a no-op)
    data_dir = Path(shutil.copytree(ws.data, tmp_path / "data"))
    manifest = data_dir / "manifest.csv"
    frames = read_manifest(manifest)
    write_manifest(manifest, [dataclasses.replace(f, digest="") for f in frames])
    text = manifest.read_text().splitlines()
    manifest.write_text("\n".join(ln.rsplit(",", 1)[0] for ln in text) + "\n")
    assert "digest" not in manifest.read_text().splitlines()[0]
    copied = load_run_data(manifest=manifest, classes_path=data_dir / "classes.json",
                           counts_path=data_dir / "class_counts.npz", folds_path=ws.folds, fold=0)
    assert all(f.digest == "" for f in copied.train_frames)
    assert provenance.data_digests(copied) == provenance.data_digests(_data(ws))
    _train(ws, cfg, runs, data=copied)
    assert "resuming tiny_f0_s0 from iteration 4/4" in capsys.readouterr().out

    # another fold assignment
    other = load_run_data(manifest=ws.manifest, classes_path=ws.classes, counts_path=ws.counts,
                          folds_path=_swap_a_video(ws, tmp_path), fold=0)
    _train(ws, cfg, runs, data=other)
    out = capsys.readouterr().out
    assert f"{paths.last}: training frames changed (fold assignment), validation frames " \
           f"changed (fold assignment); starting tiny_f0_s0 over\n" in out
    assert "resuming" not in out and _iters(paths) == [1, 2, 3, 4]
    _train(ws, cfg, runs, data=other)
    assert "resuming tiny_f0_s0 from iteration 4/4" in capsys.readouterr().out

    # one training mask redrawn (same ids, same folds): the old manifest's hashes see it
    _train(ws, cfg, runs, data=copied)
    assert "training frames changed (fold assignment)" in capsys.readouterr().out
    mask = Path(copied.train_frames[0].mask)
    from PIL import Image
    with Image.open(mask) as img:
        raw = np.asarray(img).copy()
    raw[0, 0] = 0 if raw[0, 0] != 0 else 1
    Image.fromarray(raw).save(mask)
    _train(ws, cfg, runs, data=copied)
    assert f"{paths.last}: training frames changed (image or mask contents); starting " \
           f"tiny_f0_s0 over\n" in capsys.readouterr().out
    # with the manifest's digest column (prepare's): a changed digest is a changed frame
    data = _data(ws)
    changed = dataclasses.replace(data, val_frames=[dataclasses.replace(
        data.val_frames[0], digest="0" * 16), *data.val_frames[1:]])
    _train(ws, cfg, runs, data=data)
    capsys.readouterr()
    _train(ws, cfg, runs, data=changed)
    assert "validation frames changed (image or mask contents); starting" in capsys.readouterr().out


def test_a_student_starts_over_when_its_teacher_changes(demo_workspace, tmp_path, capsys):
    from pipeline.models.checkpoint import save_checkpoint

    ws = demo_workspace
    short = {"iters": 4, "val_interval": 4, "ckpt_interval": 2, "swa": {"iters": 0}}
    teacher_paths, _ = _train(ws, _cfg(ws, **short), tmp_path / "runs")
    student = _cfg(ws, "kd", **short, distill={"teacher": "tiny", "weight": 0.5})
    paths = RunPaths(tmp_path / "runs" / "kd_f0_s0")

    def run():
        train_run(cfg=student, paths=paths, fold=0, seed=0, data=_data(ws), device=CPU,
                  teacher=teacher_paths.best, progress=False)
        return capsys.readouterr().out

    run()
    assert "resuming kd_f0_s0 from iteration 4/4" in run()
    model, ckpt = model_from_checkpoint(teacher_paths.best)  # the teacher is trained again
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    save_checkpoint(teacher_paths.best, model=model, config=ckpt["config"],
                    classes=ckpt["classes"], fold=0, seed=0, iteration=4)
    assert f"{paths.last}: teacher weights changed; starting kd_f0_s0 over\n" in run()
    assert "resuming kd_f0_s0 from iteration 4/4" in run()


