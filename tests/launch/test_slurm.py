"""Members as a Slurm job array (``pipeline/parallel.py --launcher slurm``) on a real cluster.

A single-node cluster (munged, slurmctld, slurmd on this host: ``slurm_cluster.py``) is started
for this module and stopped at its end, failing tests included; without the binaries or root
the tests that need it skip with the reason (``.ci/run`` installs ``slurm-wlm`` and ``munge``).

The tiny chain of ``tests/stages/test_e2e.py`` is built twice from one snapshot of the
repository: by local lanes, and through the
launcher, whose first run has one member's array task cancelled (``scancel``) in the middle of
its training. That run must report the task (member, log, last error line) and stop before the
students and the rest; the second run submits only what is missing, resumes and must give the
local build's submission zip and ensemble weights. One Slurm build serves both tests, to keep
the module to a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from submitit.helpers import DelayedSubmission

from pipeline.core.errors import PipelineError
from pipeline.core.runs import RunPaths
from pipeline.launch.slurm import MemberChain, SlurmParams, last_error_line, load_slurm_params
from pipeline.models.checkpoint import load_checkpoint

from conftest import REPO  # the repository root, defined once
from slurm_cluster import Cluster, free_port, why_not
from test_e2e import copy_repo, run, tiny_params

BUILDS = pytest.mark.timeout(2400)  # two tiny chains on 2 busy cores, fixtures included
LAUNCH = [sys.executable, "pipeline/parallel.py", "--launcher", "slurm"]
COMPARED = ("submissions/submission.zip", "ensemble/weights.json", "folds/folds.csv")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The running cluster; ``SLURM_CONF`` points every command of this module at it."""
    if why_not() is not None:
        pytest.skip(why_not())
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    previous = os.environ.get("SLURM_CONF")
    try:
        try:
            cluster.start()
        except RuntimeError as err:
            pytest.skip(f"the Slurm cluster did not start: {err}")
        os.environ["SLURM_CONF"] = str(cluster.conf)
        yield cluster
    finally:
        cluster.stop()
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    """One copy of the repository with the tiny params, taken once: both builds start from it,
    so edits to the working tree between them cannot make them differ."""
    if shutil.which("git") is None:
        pytest.skip("git is needed to copy the repository")
    src = tmp_path_factory.mktemp("snapshot")
    copy_repo(src)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (src / "params.yaml").write_text(yaml.safe_dump(tiny_params(params), sort_keys=False))
    return src


def _workspace(snapshot: Path, work: Path) -> Path:
    shutil.copytree(snapshot, work, dirs_exist_ok=True)
    for git in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        assert run(git, work).returncode == 0
    return work


@pytest.fixture(scope="module")
def local_chain(snapshot, tmp_path_factory) -> Path:
    """The same snapshot built by local lanes."""
    work = _workspace(snapshot, tmp_path_factory.mktemp("local"))
    built = run([sys.executable, "pipeline/parallel.py", "--jobs", "2"], work)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return work


def _cancel_one_in_training(cluster: Cluster, work: Path, launcher: subprocess.Popen) -> str:
    """``scancel`` the first array task seen in its train stage; return its task id."""
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and launcher.poll() is None:
        for log in sorted((work / "logs" / "slurm").glob("*_*_0_log.out")):
            if "Running stage 'train@" in log.read_text(errors="replace"):
                task = log.name.removesuffix("_0_log.out")
                assert cluster.run("scancel", task).returncode == 0
                return task
        time.sleep(0.5)
    raise AssertionError(f"no array task reached its train stage\n{cluster.logs()}")


@pytest.fixture(scope="module")
def slurm_chain(cluster, snapshot, tmp_path_factory) -> dict:
    """The tiny chain through the launcher: run 1 with a task cancelled, run 2 to finish."""
    work = _workspace(snapshot, tmp_path_factory.mktemp("slurm_repo"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(LAUNCH, cwd=work, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        cancelled = _cancel_one_in_training(cluster, work, first)
        out, err = first.communicate(timeout=1200)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    zip_after_first = (work / "submissions" / "submission.zip").exists()
    second = run(LAUNCH, work)
    print(f"--- run 1 (exit {first.returncode}):\n{out}{err}--- run 2 (exit {second.returncode}):\n"
          f"{second.stdout}{second.stderr}")  # shown with -s: the launcher's own words
    return {"work": work, "cancelled": cancelled, "first": (first.returncode, out, err),
            "zip_after_first": zip_after_first, "second": second}


@pytest.mark.parametrize("launch, expected", [
    (None, SlurmParams()),
    ({"slurm": {"partition": "gpu", "gpus_per_task": 1, "mem_gb": 16, "extra": {"account": "x"}}},
     SlurmParams(partition="gpu", gpus_per_task=1, mem_gb=16.0, extra={"account": "x"})),
    ({"slurm": {"parition": "gpu"}}, "unknown key 'launch.slurm.parition'; valid keys"),
    ({"slurmm": {}}, "unknown key 'launch.slurmm'"),
    ({"slurm": {"time_min": "1h"}}, "'launch.slurm.time_min' must be int"),
    ({"slurm": {"cpus_per_task": 0}}, "'launch.slurm.cpus_per_task' must be >= 1"),
])
def test_launch_section_is_optional_and_typos_are_named(tmp_path, launch, expected):
    params = {"train": {}} if launch is None else {"launch": launch}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    if isinstance(expected, SlurmParams):
        assert load_slurm_params(tmp_path / "params.yaml") == expected
    else:
        with pytest.raises(PipelineError, match=re.escape(expected)):
            load_slurm_params(tmp_path / "params.yaml")


def test_last_error_line_is_the_chains_not_submitits(tmp_path):
    log = tmp_path / "7_1_0_log.err"
    log.write_text("Running stage 'train@m-0-0':\nerror: runs/m_f0_s0: loss is NaN at iteration 3\n"
                   "ERROR: failed to reproduce 'train@m-0-0': failed to run: python ..., exited 2\n"
                   "submitit ERROR (2026) - Submitted job triggered an exception\nTraceback (most "
                   "recent call last):\n  File \"x.py\", line 1\nPipelineError: exited 255\n"
                   "srun: error: vm: task 0: Exited with exit code 1\n")
    assert last_error_line(log) == "error: runs/m_f0_s0: loss is NaN at iteration 3"
    log.write_text(log.read_text() + "slurmstepd: error: *** JOB 7 ON vm CANCELLED AT 12:00 ***\n")
    assert last_error_line(log) == "slurmstepd: error: *** JOB 7 ON vm CANCELLED AT 12:00 ***"
    assert last_error_line(tmp_path / "missing.err") == "(no log)"


def test_a_preempted_chain_requeues_itself():
    """submitit pickles the task, and on USR2 calls checkpoint(): the same chain again."""
    chain = MemberChain("/shared/ws", ["train@m-0-0", "swa@m-0-0", "infer@m-0-0"])
    again = pickle.loads(pickle.dumps(chain))
    delayed = again.checkpoint()
    assert isinstance(delayed, DelayedSubmission) and isinstance(delayed.function, MemberChain)
    assert (delayed.function.workspace, delayed.function.stages) == (chain.workspace, chain.stages)
    assert delayed.function.member == "m-0-0"


@BUILDS
def test_a_cancelled_task_is_reported_and_a_rerun_submits_only_what_is_missing(slurm_chain):
    code, out, err = slurm_chain["first"]
    task = slurm_chain["cancelled"]
    assert code != 0, out + err
    report = re.search(rf"FAILED (\S+) \(task {task}\): .*; log: (\S+)\n  \| (.*)\n", out)
    assert report, out + err
    member, log, line = report.groups()
    assert Path(log).is_file() and "CANCELLED" in line, (log, line)
    assert f"{task.split('_')[0]}_" in Path(log).name
    assert "member chain(s) failed on Slurm" in err, err
    assert "== students" not in out and "== the rest" not in out, out  # nothing on a partial set
    work = slurm_chain["work"]
    assert not slurm_chain["zip_after_first"]
    second = slurm_chain["second"]
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    teachers, students = re.findall(r"(\d+) of (\d+) up to date; (\d+) to submit", second.stdout)
    assert teachers == (str(int(teachers[1]) - 1), teachers[1], "1"), second.stdout
    assert students == ("0", students[1], students[1]), second.stdout
    assert re.search(r"slurm: 0 pending, 0 running, 1 done, 0 failed", second.stdout)
    run_dir = work / "runs" / f"{member.rsplit('-', 2)[0]}_f{member.rsplit('-', 2)[1]}_s0"
    assert load_checkpoint(RunPaths(run_dir).last)["iteration"] > 0  # it was resumed and finished


@BUILDS
def test_slurm_array_gives_the_local_result(slurm_chain, local_chain):
    work = slurm_chain["work"]
    assert slurm_chain["second"].returncode == 0, slurm_chain["second"].stderr[-3000:]
    for name in COMPARED:
        a, b = (local_chain / name).read_bytes(), (work / name).read_bytes()
        if name.endswith("weights.json"):  # the fingerprint holds file times, the study its
            a, b = (json.loads(x) for x in (a, b))  # storage path: both per copy
            for w in (a, b):
                w.pop("study")
                w.pop("fingerprint")
        assert a == b, name
    again = run([sys.executable, "-m", "dvc", "status"], work)
    assert again.returncode == 0 and "up to date" in again.stdout, again.stdout


@BUILDS
def test_two_process_ddp_training_under_srun(cluster, demo_workspace, tmp_path):
    """torchrun inside one Slurm step (2 CPUs): the 2-process gloo DDP run of test_train."""
    ws = demo_workspace
    params = ws.write_params(tmp_path / "params.yaml", models={"tiny": {
        "iters": 4, "val_interval": 2, "batch_size": 4, "swa": {"iters": 2, "interval": 2}}})
    cmd = ["srun", "--ntasks=1", "--cpus-per-task=2", "--mem=2G", "--time=10",
           sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(REPO / "pipeline" / "train.py"), *ws.train_args(params=params, runs=tmp_path / "runs")]
    done = cluster.run(*cmd, cwd=ws.root, timeout=600,
                       env={"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stderr[-3000:] + cluster.logs()
    paths = RunPaths(tmp_path / "runs" / "tiny_f0_s0")
    assert done.stdout.count(f"{paths.root}: done, 6 iterations") == 1  # rank 0 reports
    assert load_checkpoint(paths.last)["iteration"] == 6 and paths.best.is_file()
