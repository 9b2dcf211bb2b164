"""Resuming a run (pipeline.training.resume) in process: an interrupted run ends as an
uninterrupted one (with class-aware sampling too), a finished one is a no-op, another config
(another sampling too) starts over, float rounding of the stored config and a checkpoint older
than the sampling section do not."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pipeline.core.curves import TRAIN, VAL, curve_path
from pipeline.core.runs import RunPaths
from pipeline.models.checkpoint import load_checkpoint
from pipeline.training.resume import _compatible

from test_loop import _assert_same_tensors, _cfg, _data, _iters, _loss_hook, _rows, _train


# ----------------------------------------------------------------------------- resume
def _interrupted_run(ws, cfg, out, monkeypatch, *, at_call: int) -> None:
    """Train ``cfg`` into ``out`` and stop it with a KeyboardInterrupt at loss call ``at_call``."""

    def interrupt(call, loss, parts):
        if call == at_call:
            raise KeyboardInterrupt
        return loss, parts

    with monkeypatch.context() as patch:
        _loss_hook(patch, interrupt)
        with pytest.raises(KeyboardInterrupt):
            _train(ws, cfg, out)


def test_resume_after_interrupt_equals_uninterrupted_run(demo_workspace, tmp_path, monkeypatch,
                                                         capsys):
    ws = demo_workspace
    cfg = _cfg(ws)  # 8 + 4 SWA iterations, checkpoint every 2, validation every 4
    a, metrics_a = _train(ws, cfg, tmp_path / "a")

    _interrupted_run(ws, cfg, tmp_path / "b", monkeypatch, at_call=7)  # iteration 8 of 12:
    # last.pt holds iteration 6, the log goes to 7
    b = RunPaths(tmp_path / "b" / a.root.name)
    assert load_checkpoint(b.last)["iteration"] == 6
    assert _iters(b) == list(range(1, 8))
    assert not b.metrics.exists()
    capsys.readouterr()

    _, metrics_b = _train(ws, cfg, tmp_path / "b")
    assert f"resuming {a.root.name} from iteration 6/12" in capsys.readouterr().out
    for name in ("last.pt", "best.pt", "snapshots/swa_0000010.pt", "snapshots/swa_0000012.pt"):
        _assert_same_tensors(load_checkpoint(b.train_dir / name)["model"],
                             load_checkpoint(a.train_dir / name)["model"])
    opt_a, opt_b = (load_checkpoint(p.last)["optimizer"]["state"] for p in (a, b))
    for k in opt_a:
        _assert_same_tensors(opt_a[k], opt_b[k])
    # the log continues without repeats and holds the uninterrupted run's losses
    log_a, log_b = _rows(a), _rows(b)
    assert _iters(b) == list(range(1, 13))
    assert [{k: v for k, v in r.items() if k != "images_per_s"} for r in log_b] == \
           [{k: v for k, v in r.items() if k != "images_per_s"} for r in log_a]
    assert _rows(b, VAL) == _rows(a, VAL)
    same = ("best_miou", "best_iter", "last_miou", "last_pixel_acc", "swa_snapshots")
    assert {k: metrics_b[k] for k in same} == {k: metrics_a[k] for k in same}
    assert b.class_iou.read_text() == a.class_iou.read_text()


def test_finished_run_is_a_no_op_and_a_new_config_starts_over(demo_workspace, tmp_path, capsys):
    ws = demo_workspace
    cfg = _cfg(ws)
    paths, metrics = _train(ws, cfg, tmp_path)
    files = {p: p.read_bytes() for p in (paths.last, paths.best, paths.snapshot(12),
                                         curve_path(paths.curves, TRAIN, "loss"),
                                         curve_path(paths.curves, VAL, "miou"))}
    paths.metrics.unlink()
    capsys.readouterr()
    _, again = _train(ws, cfg, tmp_path)
    assert "from iteration 12/12" in capsys.readouterr().out
    assert again == metrics and json.loads(paths.metrics.read_text()) == metrics
    assert metrics["images_per_s"] > 0
    assert all(p.read_bytes() == data for p, data in files.items())

    # another config in the same run dir: nothing of the old run survives
    paths.swa.write_bytes(b"stale average of the old run")
    new = _cfg(ws, iters=6, swa={"iters": 0},
               loss=[{"name": "ce"}, {"name": "dice", "weight": 0.5}])
    _, metrics = _train(ws, new, tmp_path)
    out = capsys.readouterr().out
    assert f"{paths.last}: saved with another config; starting {paths.root.name} over" in out
    assert load_checkpoint(paths.last)["config"]["run"] == new.to_dict()
    assert _iters(paths) == list(range(1, 7))
    assert set(_rows(paths)[0]) == {"iter", "lr", "loss", "ce", "dice", "images_per_s"}
    assert _iters(paths, VAL) == [4, 6]
    assert not paths.swa.exists() and not paths.snapshots.exists()
    assert metrics["swa_snapshots"] == 0 and metrics["iterations"] == 6


def test_resume_check_tolerates_float_rounding_of_the_stored_prior():
    """A checkpoint re-normalizes the logit-adjustment prior on save; the few-ulp difference
    must not make a finished run look like another config (it used to restart fold 0)."""
    prior = [0.1975600210600675, 0.8024399789399325]
    config = {"run": {"lr": 0.001}, "fold": 0, "seed": 0,
              "model": {"arch": "unet", "logit_adjust": {"prior": prior, "tau": 0.03}}}
    saved = {"config": {**config, "model": {"arch": "unet", "logit_adjust": {
        "prior": [p * (1 + 2e-16) for p in prior], "tau": 0.03}}}}
    assert _compatible(saved, config)
    changed = {"config": {**config, "run": {"lr": 0.002}}}
    assert not _compatible(changed, config)
    other_prior = {"config": {**config, "model": {"arch": "unet", "logit_adjust": {
        "prior": [0.2, 0.8], "tau": 0.03}}}}
    assert not _compatible(other_prior, config)


def test_swa_snapshots_and_average_go_on_a_fresh_start(demo_workspace, tmp_path, capsys):
    ws = demo_workspace
    cfg = _cfg(ws)
    paths, _ = _train(ws, cfg, tmp_path)
    assert list(paths.snapshots.iterdir())
    paths.swa.write_bytes(b"average of the old snapshots")
    data = _data(ws)
    changed = dataclasses.replace(data, train_frames=[dataclasses.replace(
        data.train_frames[0], digest="0" * 16), *data.train_frames[1:]])
    _train(ws, _cfg(ws, swa={"iters": 0}), tmp_path, data=changed)
    assert "starting tiny_f0_s0 over" in capsys.readouterr().out
    assert not paths.swa.exists() and not paths.snapshots.exists()




# ----------------------------------------------------------------------------- class-aware sampling
RARE_SAMPLING = {"frames": "rare", "temperature": 0.5, "crops": "rare", "crop_share": 0.5}


def test_rare_sampling_resumes_its_stream_and_another_sampling_starts_over(
        demo_workspace, tmp_path, monkeypatch, capsys):
    ws = demo_workspace
    cfg = _cfg(ws, sampling=RARE_SAMPLING, swa={"iters": 0})  # 8 iterations, checkpoint every 2
    a, _ = _train(ws, cfg, tmp_path / "a")
    assert load_checkpoint(a.last)["config"]["run"]["sampling"] == RARE_SAMPLING

    _interrupted_run(ws, cfg, tmp_path / "b", monkeypatch, at_call=5)  # iteration 6 of 8:
    # last.pt holds iteration 4
    b = RunPaths(tmp_path / "b" / a.root.name)
    assert load_checkpoint(b.last)["iteration"] == 4
    capsys.readouterr()
    _train(ws, cfg, tmp_path / "b")
    assert f"resuming {a.root.name} from iteration 4/8" in capsys.readouterr().out
    _assert_same_tensors(load_checkpoint(b.last)["model"], load_checkpoint(a.last)["model"])
    assert [{k: v for k, v in r.items() if k != "images_per_s"} for r in _rows(b)] == \
           [{k: v for k, v in r.items() if k != "images_per_s"} for r in _rows(a)]

    # the uniform default in the same folder is another run, on another stream
    _train(ws, _cfg(ws, swa={"iters": 0}), tmp_path / "b")
    assert f"{b.last}: saved with another config; starting {b.root.name} over" in \
        capsys.readouterr().out
    assert [r["loss"] for r in _rows(b)] != [r["loss"] for r in _rows(a)]


def test_checkpoint_from_before_sampling_resumes_under_the_default(demo_workspace):
    """last.pt files written before ``sampling`` existed ran uniform, as the default does now:
    a finished run is not trained again, while a rare-sampling config starts over."""
    ws = demo_workspace
    config = {"run": _cfg(ws).to_dict(), "fold": 0, "seed": 0, "model": {"arch": "unet"}}
    older = {"config": {**config, "run": {k: v for k, v in config["run"].items()
                                          if k != "sampling"}}}
    assert _compatible(older, config) and _compatible({"config": config}, config)
    rare = {**config, "run": _cfg(ws, sampling=RARE_SAMPLING).to_dict()}
    assert not _compatible(older, rare) and not _compatible({"config": config}, rare)
