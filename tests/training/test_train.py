"""Stage `train` through its CLI: errors, `--fold all`, distillation, NaN stop, a real kill -9
and resume, and a 2-process gloo DDP run (torchrun) on the CPU."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from pipeline.core.curves import VAL
from pipeline.core.errors import run_cli
from pipeline.core.runs import RunPaths
from pipeline.models.checkpoint import load_checkpoint, model_from_checkpoint
from pipeline.train import main
from pipeline.training.run_data import teacher_weights

from test_loop import _assert_same_tensors, _iters, _rows

TIMEOUT = 180  # seconds, for a subprocess that should take ~10


def cli(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("models, args, expected", [
    ({}, {"model": "tinyy"}, "unknown model config 'tinyy'; valid: tiny"),
    ({"tiny": {"itres": 5}}, {}, "unknown key 'models.tiny.itres'; valid keys of 'models.tiny':"),
    ({"tiny": {"optimizer": {"name": "adamw", "lrr": 0.1}}}, {},
     "unknown key 'models.tiny.optimizer.lrr'; valid keys of 'models.tiny.optimizer':"),
    ({"tiny": {"swa": {"iters": 3, "interval": 2}}}, {},
     "models.tiny.swa: iters (3) must be a non-negative multiple of interval (2)"),
    ({}, {"fold": 2}, "fold 2 is not one of 0..1 or 'all'"),
    ({}, {"fold": "first"}, "--fold must be a fold number or 'all', got 'first'"),
], ids=["model-name", "model-key", "subsection-key", "swa-cycles", "fold-range", "fold-word"])
def test_bad_input_is_one_error_line_and_writes_nothing(demo_workspace, tmp_path, capsys, models,
                                                        args, expected):
    params = demo_workspace.write_params(tmp_path / "params.yaml", models=models)
    args = {"model": "tiny", "fold": 0, **args}
    argv = demo_workspace.train_args(args["model"], args["fold"], params=params,
                                     runs=tmp_path / "runs")
    code, out, err = cli(argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert expected in err
    assert not (tmp_path / "runs").exists()


def test_non_finite_loss_exits_2_keeping_the_last_checkpoint(demo_workspace, tmp_path, capsys):
    params = demo_workspace.write_params(tmp_path / "params.yaml", models={"tiny": {
        "optimizer": {"name": "sgd", "lr": 1e30, "momentum": 0.0}, "ckpt_interval": 1}})
    runs = tmp_path / "runs"
    code, _, err = cli(demo_workspace.train_args(params=params, runs=runs), capsys)
    assert code == 2 and err.count("\n") == 1
    assert "error: tiny_f0_s0: loss is " in err and "; stopped. Last good checkpoint: " in err
    assert "Lower the lr or set grad_clip in models.tiny" in err
    paths = RunPaths(runs / "tiny_f0_s0")
    stopped_at = int(err.split(" at iteration ")[1].split(";")[0])
    assert 1 <= stopped_at < 12
    assert f"{paths.last} (iteration {stopped_at})" in err  # a checkpoint every iteration
    assert load_checkpoint(paths.last)["iteration"] == stopped_at
    assert not paths.metrics.exists()


# ----------------------------------------------------------------------------- whole folds
def test_fold_all_trains_on_every_frame_without_validation(demo_workspace, tmp_path, capsys):
    params = demo_workspace.write_params(tmp_path / "params.yaml",
                                         models={"tiny": {"iters": 4, "swa": {"iters": 0}}})
    code, out, _ = cli(demo_workspace.train_args("tiny", "all", params=params,
                                                 runs=tmp_path / "runs"), capsys)
    assert code == 0
    paths = RunPaths(tmp_path / "runs" / "tiny_fall_s0")
    assert f"{paths.root}: done, 4 iterations" in out and "mIoU" not in out
    # re-running the finished run is a no-op that returns (and rewrites) its metrics
    metrics = main(demo_workspace.train_args("tiny", "all", params=params, runs=tmp_path / "runs"))
    n_train = sum(1 for line in demo_workspace.folds.read_text().splitlines()[1:] if line)
    assert (metrics["train_frames"], metrics["val_frames"]) == (n_train, 0)
    assert metrics["best_miou"] is None and metrics["iterations"] == 4
    assert _rows(paths, VAL) == [] and _iters(paths) == [1, 2, 3, 4]  # no validation curve
    best, last = load_checkpoint(paths.best), load_checkpoint(paths.last)
    assert best["fold"] == "all" and best["iteration"] == last["iteration"] == 4
    _assert_same_tensors(best["model"], last["model"])


# ----------------------------------------------------------------------------- distillation
def test_student_distills_from_the_teacher_run_of_its_fold(demo_workspace, tmp_path, capsys):
    ws, runs = demo_workspace, tmp_path / "runs"
    params = ws.write_params(tmp_path / "params.yaml", models={"student": {
        "iters": 4, "swa": {"iters": 0}, "distill": {"teacher": "tiny", "weight": 0.5,
                                                     "temperature": 2.0}}})
    code, _, err = cli(ws.train_args("student", 1, params=params, runs=runs), capsys)
    assert code == 2 and err.count("\n") == 1
    assert "distill.teacher 'tiny'" in err
    assert "python pipeline/train.py --model tiny --fold 1 --seed 0" in err
    assert not (runs / "student_f1_s0").exists()

    teacher = ws.train("tiny", 0, params=params, runs=runs)
    main(ws.train_args("student", 0, params=params, runs=runs))
    student = RunPaths(runs / "student_f0_s0")
    log = _rows(student)
    assert set(log[0]) == {"iter", "lr", "loss", "ce", "distill", "images_per_s"}
    for row in log:
        loss, ce, kd = (float(row[k]) for k in ("loss", "ce", "distill"))
        assert kd > 0 and loss == pytest.approx(ce + 0.5 * kd, abs=2e-5)
    ckpt = load_checkpoint(student.best)
    assert ckpt["config"]["run"]["distill"]["teacher"] == "tiny"
    # the teacher's weights: its SWA average once swa.py wrote one, else its best checkpoint
    assert teacher_weights("tiny", runs_dir=runs, fold=0, seed=0) == teacher.best
    teacher.swa.write_bytes(teacher.best.read_bytes())
    assert teacher_weights("tiny", runs_dir=runs, fold=0, seed=0) == teacher.swa


# ----------------------------------------------------------------------------- kill -9, resume
def test_killed_run_resumes_to_the_uninterrupted_weights(demo_workspace, tmp_path, repo_root):
    ws = demo_workspace
    params = ws.write_params(tmp_path / "params.yaml", models={"tiny": {
        "iters": 60, "val_interval": 30, "ckpt_interval": 4, "swa": {"iters": 0}}})
    a = RunPaths(tmp_path / "a" / "tiny_f0_s0")
    main(ws.train_args(params=params, runs=tmp_path / "a"))  # uninterrupted, in process

    b = RunPaths(tmp_path / "b" / "tiny_f0_s0")
    cmd = [sys.executable, str(repo_root / "pipeline" / "train.py"),
           *ws.train_args(params=params, runs=tmp_path / "b")]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (b.last.is_file() and len(_rows(b)) >= 10):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=TIMEOUT)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(b.last)["iteration"]
    assert 0 < killed_at < 60
    assert not b.metrics.exists()

    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert f"resuming tiny_f0_s0 from iteration {killed_at}/60" in done.stdout
    for name in ("last.pt", "best.pt"):
        _assert_same_tensors(load_checkpoint(b.train_dir / name)["model"],
                             load_checkpoint(a.train_dir / name)["model"])
    assert _iters(b) == list(range(1, 61))  # no duplicate iteration after the resume
    assert [r["loss"] for r in _rows(b)] == [r["loss"] for r in _rows(a)]
    assert _rows(b, VAL) == _rows(a, VAL)
    assert not list(b.root.rglob("*.tmp"))


# ----------------------------------------------------------------------------- DDP
def test_two_process_gloo_ddp_run(demo_workspace, tmp_path, repo_root):
    ws = demo_workspace
    # batch_size is the global batch: each of the 2 ranks draws 2 images per step
    params = ws.write_params(tmp_path / "params.yaml", models={"tiny": {
        "iters": 4, "val_interval": 2, "batch_size": 4, "swa": {"iters": 2, "interval": 2}}})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(repo_root / "pipeline" / "train.py"),
           *ws.train_args(params=params, runs=tmp_path / "runs")]
    done = subprocess.run(cmd, cwd=ws.root, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    paths = RunPaths(tmp_path / "runs" / "tiny_f0_s0")
    assert done.stdout.count(f"{paths.root}: done, 6 iterations") == 1  # rank 0 reports
    assert _iters(paths) == list(range(1, 7))  # rank 0 logs, once per iteration
    assert _iters(paths, VAL) == [2, 4, 6]
    assert sorted(p.name for p in paths.snapshots.iterdir()) == ["swa_0000006.pt"]
    assert not list(paths.root.rglob("*.tmp"))
    model, ckpt = model_from_checkpoint(paths.last)
    assert ckpt["iteration"] == 6
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10, 32, 32)
    assert load_checkpoint(paths.best)["iteration"] in (2, 4, 6)
