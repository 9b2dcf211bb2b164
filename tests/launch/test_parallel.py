"""Tests for pipeline/parallel.py: the stage names it runs exist in dvc.yaml, lanes' env."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.core.runs import load_train_params
from pipeline.launch.lanes import lane_env, member_targets
from pipeline.parallel import main

from conftest import REPO  # the repository root, defined once


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


# A stand-in for `python -m dvc`: `repro folds` ends at once; a lane (`repro -s ...`) starts a
# child, like DVC starting the stage's command, records both pids and sleeps.
FAKE_DVC = """
import os, subprocess, sys, time
from pathlib import Path
if "-s" not in sys.argv[1:]:
    sys.exit(0)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
pids = Path(os.environ["FAKE_DVC_PIDS"])
(pids / f".{os.getpid()}").write_text(f"{os.getpid()} {child.pid}")
os.replace(pids / f".{os.getpid()}", pids / str(os.getpid()))
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    """Running (not a zombie waiting to be reaped by whoever inherited it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_script_stops_every_lane(signum, tmp_path):
    """`kill PID` (or SIGINT to the script alone) must not leave lanes running and holding DVC's
    lock: they are signalled, waited for, and the script exits 128 + signal."""
    (tmp_path / "fake" / "dvc").mkdir(parents=True)
    (tmp_path / "fake" / "dvc" / "__init__.py").write_text("")
    (tmp_path / "fake" / "dvc" / "__main__.py").write_text(FAKE_DVC)
    pids = tmp_path / "pids"
    pids.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update(folds=[0, 1], seeds=[0])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake"), "FAKE_DVC_PIDS": str(pids)}
    proc = subprocess.Popen([sys.executable, str(REPO / "pipeline" / "parallel.py"), "--jobs", "2",
                             "--params", "params.yaml", "--logs", "logs"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    launched: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len([p for p in pids.iterdir() if not p.name.startswith(".")]) < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the two lanes did not start"
            time.sleep(0.05)
        launched = [int(x) for p in pids.iterdir() if not p.name.startswith(".")
                    for x in p.read_text().split()]
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signum, (out, err)
        assert "waiting for them to end" in err and "every lane has ended" in err, err
        assert "Traceback" not in err, err
        deadline = time.monotonic() + 5  # signalled grandchildren may take a moment to go
        while [pid for pid in launched if _alive(pid)] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in launched if _alive(pid)], "a lane outlived parallel.py"
    finally:
        for pid in launched:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
