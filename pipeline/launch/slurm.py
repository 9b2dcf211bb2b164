"""Members on a Slurm cluster: the member chains that are not up to date as one job array.

Run as ``python pipeline/parallel.py --launcher slurm``. The chains are the lanes' ones
(:func:`pipeline.launch.lanes.member_targets`), each one ``dvc --wait-for-lock repro -s
train@<member> swa@<member> infer@<member>`` run by a task of one ``submitit`` job array in
the same workspace, which every node must see at the same path (with the DVC cache and
``runs/``). Only the chains ``dvc status`` reports as changed are submitted, so a second run
submits what is still missing. The tasks' logs are submitit's, in ``logs/slurm/``
(``<job>_<task>_log.out`` / ``.err``).

While the array runs, one line counts its tasks (pending / running / done / failed): updated
in place on a terminal, printed as a plain line when it changes into a log. A failed task is
reported at once with its member, its log and the log's last error line; the other tasks go
on, and the launcher then stops (no students, no ``dvc repro`` on a partial set of members).

Preemption and time limits: Slurm signals the task (``USR2``) before it stops it; submitit
then calls :meth:`MemberChain.checkpoint`, which ends the chain's ``dvc`` process and requeues
the same chain: training resumes from ``last.pt`` and inference from the maps written. The
resources come from the optional ``launch.slurm`` section of params.yaml (:class:`SlurmParams`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from submitit import AutoExecutor
from submitit.helpers import Checkpointable, DelayedSubmission

from pipeline.core.errors import PipelineError
from pipeline.core.params import build_section, read_params

LIVE = {"PENDING": "pending", "CONFIGURING": "pending", "REQUEUED": "pending",
        "REQUEUE_HOLD": "pending", "REQUEUE_FED": "pending", "RESIZING": "pending",
        "SUSPENDED": "pending", "RUNNING": "running", "COMPLETING": "running",
        "STAGE_OUT": "running", "SIGNALING": "running"}   # squeue's states -> the count's
KINDS = ("pending", "running", "done", "failed")
GONE_POLLS = 3          # polls a task may be out of the queue before its result file shows up
LOG_INTERVAL = 60.0     # seconds between unchanged count lines in a log


@dataclass(frozen=True)
class SlurmParams:
    """``launch.slurm`` of params.yaml: what each array task (one member chain) asks for."""

    partition: str = ""          # '' = the cluster's default partition
    gpus_per_task: int = 0       # GPUs of each member chain (0 on a CPU cluster)
    cpus_per_task: int = 1       # also the chain's OMP_NUM_THREADS
    mem_gb: float = 4.0          # memory of each task
    time_min: int = 60           # time limit per task; requeued (resuming) when it is reached
    array_parallelism: int = 16  # tasks of the array running at once
    extra: dict = field(default_factory=dict)   # more sbatch options, e.g. {account: abc}


@dataclass(frozen=True)
class LaunchParams:
    """The optional ``launch:`` section of params.yaml (absent = the defaults)."""

    slurm: dict = field(default_factory=dict)


def load_slurm_params(params_path: str | Path) -> SlurmParams:
    """``launch.slurm`` of ``params_path`` (unknown keys and bad values name the key)."""
    source = str(params_path)
    launch = build_section(LaunchParams, read_params(params_path).get("launch"),
                           section="launch", source=source)
    slurm = build_section(SlurmParams, launch.slurm, section="launch.slurm", source=source)
    for key in ("cpus_per_task", "time_min", "array_parallelism"):
        if getattr(slurm, key) < 1:
            raise PipelineError(f"{source}: 'launch.slurm.{key}' must be >= 1")
    if slurm.gpus_per_task < 0 or slurm.mem_gb <= 0:
        raise PipelineError(f"{source}: 'launch.slurm.gpus_per_task' must be >= 0 and "
                            f"'launch.slurm.mem_gb' > 0")
    return slurm


def make_executor(slurm: SlurmParams, *, folder: Path, name: str = "segpipe"):
    """A submitit Slurm executor whose jobs write their logs and pickles to ``folder``."""
    executor = AutoExecutor(folder=folder, cluster="slurm")
    options = {"name": name, "nodes": 1, "tasks_per_node": 1, "timeout_min": slurm.time_min,
               "cpus_per_task": slurm.cpus_per_task, "mem_gb": slurm.mem_gb,
               "slurm_array_parallelism": slurm.array_parallelism,
               "slurm_additional_parameters": dict(slurm.extra)}
    if slurm.partition:
        options["slurm_partition"] = slurm.partition
    if slurm.gpus_per_task:
        options["gpus_per_node"] = slurm.gpus_per_task
    executor.update_parameters(**options)
    return executor


class MemberChain(Checkpointable):
    """One array task: ``dvc --wait-for-lock repro -s <stages>`` in ``workspace``; returns the
    member's name, raises with the exit code when the chain fails."""

    def __init__(self, workspace: str | Path, stages: Sequence[str]) -> None:
        self.workspace, self.stages = str(workspace), list(stages)
        self._proc: subprocess.Popen | None = None

    @property
    def member(self) -> str:
        return self.stages[-1].split("@", 1)[-1]

    def __call__(self) -> str:
        env = dict(os.environ)
        threads = env.get("SLURM_CPUS_PER_TASK", "1")
        env.setdefault("OMP_NUM_THREADS", threads)
        env.setdefault("MKL_NUM_THREADS", threads)
        cmd = [sys.executable, "-m", "dvc", "--wait-for-lock", "repro", "-s", *self.stages]
        print(f"$ (cd {self.workspace} && dvc --wait-for-lock repro -s {' '.join(self.stages)})",
              flush=True)
        # USR2 (Slurm's warning before a preemption or the time limit) is for submitit alone:
        # dvc and the stage ignore it and are ended by checkpoint(), once, with SIGTERM
        self._proc = subprocess.Popen(cmd, cwd=self.workspace, env=env, start_new_session=True,
                                      preexec_fn=_ignore_usr2)
        code = self._proc.wait()
        self._proc = None
        if code != 0:
            raise PipelineError(f"`dvc repro -s {' '.join(self.stages)}` exited {code}")
        return self.member

    def checkpoint(self, *args, **kwargs):
        """Preempted or at the time limit: end the chain's dvc (what it wrote stays: last.pt,
        maps) and requeue the same chain, which resumes from there."""
        proc = self._proc
        if proc is not None:
            for signum in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signum)
                if _ended(proc.pid, timeout=60):
                    break
        return DelayedSubmission(MemberChain(self.workspace, self.stages))

    def __getstate__(self) -> dict:
        return {"workspace": self.workspace, "stages": self.stages, "_proc": None}


def _ignore_usr2() -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _ended(pid: int, *, timeout: float) -> bool:
    """Whether child ``pid`` ends within ``timeout`` s, without reaping it: checkpoint() runs in
    a signal handler while ``__call__``'s ``Popen.wait`` holds the Popen's wait lock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        time.sleep(0.2)
    return False


def stale_chains(chains: Sequence[Sequence[str]], *, cwd: Path) -> list[list[str]]:
    """The chains with a stage that ``dvc status`` reports as changed (one dvc call)."""
    if not chains:
        return []
    stages = [stage for chain in chains for stage in chain]
    done = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", *stages], cwd=cwd,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise PipelineError(f"`dvc status` failed: {(done.stderr or done.stdout).strip()[-500:]}")
    changed = {key.rsplit(":", 1)[-1] for key in json.loads(done.stdout or "{}")}
    return [list(chain) for chain in chains if changed & set(chain)]


def last_error_line(log: Path) -> str:
    """The chain's last line in a task's log that says "error" (the stage's own before DVC's
    "failed to reproduce"), else its last line; submitit's traceback and srun's exit note are
    not the chain's."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    lines, skipping = [], False
    for line in filter(None, (raw.strip() for raw in text.splitlines())):
        if line.startswith("submitit "):
            skipping = line.startswith("submitit ERROR")
        elif not skipping or line.startswith(("slurmstepd", "srun")):
            skipping = False
            if not line.startswith("srun: error:"):
                lines.append(line)
    errors = [line for line in lines if "error" in line.lower()]
    own = [line for line in errors if not line.startswith("ERROR: failed to reproduce")]
    return (own or errors or lines or ["(no log)"])[-1]


def _reason(error: Exception) -> str:
    """One line of a task's exception: its message, not submitit's list of log paths."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error: " in line:
            return line.split("Error: ", 1)[1]
    lines = [line for line in lines if not line.startswith("- ")]
    return lines[-1] if lines else type(error).__name__


def _queue(array_id: str) -> dict[str, str] | None:
    """{task id: squeue state} of the array's tasks still queued (None when squeue fails)."""
    done = subprocess.run(["squeue", "-h", "-r", "-j", array_id, "-o", "%i|%T"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return None if "Invalid job id" not in done.stderr else {}
    return dict(line.split("|", 1) for line in done.stdout.splitlines() if "|" in line)


class ArrayWatch:
    """The state of each task of one array: squeue while queued, the result file after."""

    def __init__(self, jobs: Sequence, chains: Sequence[Sequence[str]]) -> None:
        self.jobs, self.chains = list(jobs), [list(c) for c in chains]
        self.array_id = str(self.jobs[0].job_id).split("_")[0]
        self.states = ["pending"] * len(self.jobs)
        self.reasons: dict[int, str] = {}
        self._gone = [0] * len(self.jobs)

    def poll(self) -> list[int]:
        """Update the states; return the tasks that have just failed."""
        queued = _queue(self.array_id)
        failed = []
        for i, job in enumerate(self.jobs):
            if self.states[i] in ("done", "failed"):
                continue
            state = self._state(i, job, queued)
            if state == "failed":
                failed.append(i)
            self.states[i] = state
        return failed

    def _state(self, i: int, job, queued: dict[str, str] | None) -> str:
        if job.paths.result_pickle.exists():
            error = job.exception()
            if error is None:
                return "done"
            self.reasons[i] = _reason(error)
            return "failed"
        if queued is None:
            return self.states[i]
        if job.job_id in queued:
            self._gone[i] = 0
            return LIVE.get(queued[job.job_id], "running")
        self._gone[i] += 1  # out of the queue without a result: cancelled, killed, node lost
        if self._gone[i] < GONE_POLLS:
            return self.states[i]
        self.reasons[i] = f"ended without a result ({job.state})"  # sacct's word, when it has one
        return "failed"

    def counts(self) -> dict[str, int]:
        return {kind: self.states.count(kind) for kind in KINDS}

    def report(self, i: int) -> str:
        """``FAILED <member> (task <id>): <why>; log: <path>`` and its last error line."""
        job = self.jobs[i]
        member = self.chains[i][-1].split("@", 1)[-1]
        log = job.paths.stderr if job.paths.stderr.is_file() else job.paths.stdout
        return (f"FAILED {member} (task {job.job_id}): {self.reasons.get(i, 'failed')}; "
                f"log: {log}\n  | {last_error_line(log)}")


def run_array(chains: Sequence[Sequence[str]], *, slurm: SlurmParams, folder: Path,
              workspace: Path | None = None, dry_run: bool = False,
              say: Callable[[str], None] = print, stopped: Callable[[], int | None] = lambda: None,
              interval: float = 5.0, stream: TextIO | None = None) -> None:
    """Submit the chains that are not up to date as one array and wait for every task.

    Raises PipelineError when a task failed (after the others have ended). ``stopped()``
    returning a signal number (Ctrl-C, SIGTERM) cancels the unfinished tasks and exits
    128 + that number."""
    workspace = Path(workspace or Path.cwd()).resolve()
    todo = stale_chains(chains, cwd=workspace)
    say(f"  {len(chains) - len(todo)} of {len(chains)} up to date; {len(todo)} to submit")
    if dry_run or not todo:
        for chain in todo if dry_run else []:
            say(f"  array task: dvc --wait-for-lock repro -s {' '.join(chain)}")
        return
    executor = make_executor(slurm, folder=folder)
    with executor.batch():
        jobs = [executor.submit(MemberChain(workspace, chain)) for chain in todo]
    watch = ArrayWatch(jobs, todo)
    say(f"  submitted array {watch.array_id}: {len(jobs)} task(s), logs in {folder}/")
    stream = stream or sys.stdout
    tty, shown, last = stream.isatty(), "", 0.0
    while True:
        failed = watch.poll()
        counts = watch.counts()
        line = "  slurm: " + ", ".join(f"{n} {kind}" for kind, n in counts.items())
        if failed and tty and shown:
            stream.write("\r\x1b[K")
        for i in failed:
            say(watch.report(i))
        if tty:
            stream.write(f"\r\x1b[K{line}")
        elif line != shown or time.monotonic() - last > LOG_INTERVAL:
            stream.write(f"{line}\n")
            last = time.monotonic()
        stream.flush()
        shown = line
        if counts["pending"] + counts["running"] == 0:
            break
        if (signum := stopped()) is not None:
            for job in jobs:
                job.cancel(check=False)
            say(f"\nparallel.py: {signal.Signals(signum).name}: cancelled array {watch.array_id}"
                f" (finished members are kept: run this again to go on)")
            sys.exit(128 + signum)
        time.sleep(interval)
    if tty:
        stream.write("\n")
    if counts["failed"]:
        raise PipelineError(f"{counts['failed']} of {len(jobs)} member chain(s) failed on Slurm "
                            f"(see above); finished members are kept: fix it and run this again "
                            f"(only what is missing is submitted)")
