"""Members side by side: independent member chains as ``dvc repro`` processes in lanes.

Run as ``python pipeline/parallel.py``. ``dvc repro`` runs matrix members one after another. DVC
releases its lock while a stage's command runs, so independent members can run as separate ``dvc
--wait-for-lock repro`` processes. This script does that in three phases, then hands over to a
plain ``dvc repro``:

1. ``dvc repro folds`` (prepare and folds, once);
2. every model x fold x seed member, ``--jobs`` at a time: one
   ``dvc --wait-for-lock repro -s train@<model>-<fold>-<seed> swa@... infer@...`` per member,
   single stages in that order (``-s``: a lane must not touch the shared upstream stages that
   another lane's running stage reads);
3. every student (``students@``, ``swa_students@``, ``infer_students@``), likewise: their
   teachers are done by then;
4. ``dvc repro``: the ensemble, the submission and whatever is left.

Each lane gets ``OMP_NUM_THREADS`` = cores / jobs on CPU, or one GPU via
``CUDA_VISIBLE_DEVICES`` with ``--gpus``. A lane's output goes to ``logs/<target>.log``; a failed
lane stops new launches and shows its log's tail. Interrupting is safe: training resumes from
its last checkpoint and inference from the maps already written on the next run.

Every ``dvc`` command runs in a process group of its own, so a lane never outlives this script:
SIGTERM or SIGINT (Ctrl-C) is passed on to every running group, the script waits for them to
end and exits 128 + the signal's number (a second signal kills the groups at once). DVC's lock
is then free for the next run.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.launch.progress import Board, LaneState


def member_targets(*, models: Sequence[str], students: Sequence[dict], folds: Sequence[int],
                   seeds: Sequence[int], student_seeds: Sequence[int]
                   ) -> tuple[list[list[str]], list[list[str]]]:
    """The DVC stages of each member's chain, in order: (teacher chains, student chains),
    named the way ``dvc.yaml``'s matrices name them (``train@<model>-<fold>-<seed>``;
    students by their list position, ``students@student<i>-<fold>-<seed>``, over
    ``student_seeds``)."""
    teachers = [[f"{stage}@{m}-{f}-{s}" for stage in ("train", "swa", "infer")]
                for m in models for f in folds for s in seeds]
    pupils = [[f"{stage}@student{i}-{f}-{s}"
               for stage in ("students", "swa_students", "infer_students")]
              for i in range(len(students)) for f in folds for s in student_seeds]
    return teachers, pupils


def lane_env(lane: int, *, jobs: int, gpus: Sequence[str], cores: int) -> dict[str, str]:
    """Environment of lane ``lane``: one GPU each (``gpus``), else an equal share of the cores."""
    env = dict(os.environ)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[lane % len(gpus)]
    threads = str(max(1, cores // max(1, jobs)))
    env.setdefault("OMP_NUM_THREADS", threads)
    env.setdefault("MKL_NUM_THREADS", threads)
    return env


def log_path(logs: Path, stage: str) -> Path:
    return logs / f"{stage.replace('@', '_')}.log"


def dvc_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


class Lanes:
    """The commands this script runs, each in a session (process group) of its own.

    Their own groups keep a terminal's Ctrl-C from reaching them behind this script's back;
    :meth:`stop`, installed by :meth:`handling_signals`, passes SIGTERM/SIGINT on to every
    group instead, and no command starts after it. ``signal`` is the first signal received.
    """

    def __init__(self) -> None:
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()  # between launching threads; never taken by stop()
        self.signal: int | None = None

    def call(self, cmd: Sequence[str], **popen) -> int:
        """Run ``cmd`` in a new session, wait and return its exit code (-signal when stopped
        before it started)."""
        with self._lock:
            if self.signal is not None:
                return -self.signal
            proc = subprocess.Popen(cmd, start_new_session=True, **popen)
            self._procs.add(proc)
        if self.signal is not None:  # a signal came between the launch and the add
            _killpg(proc, self.signal)
        try:
            return proc.wait()
        finally:
            with self._lock:
                self._procs.discard(proc)

    def stop(self, signum: int, frame=None) -> None:
        """Signal handler: pass ``signum`` on to every running group (SIGKILL on a repeat)."""
        repeat = self.signal is not None
        if not repeat:
            self.signal = signum
        procs = list(self._procs)
        name = signal.Signals(signum).name
        note = (f"{name} again: killing {len(procs)} lane(s)\n" if repeat else
                f"{name}: passed on to {len(procs)} lane(s); waiting for them to end "
                f"(send it again to kill them)\n")
        os.write(sys.stderr.fileno(), f"parallel.py: {note}".encode())
        for proc in procs:
            _killpg(proc, signal.SIGKILL if repeat else signum)

    def exit_if_stopped(self) -> None:
        """After the lanes have ended: exit 128 + signal if a signal stopped them."""
        if self.signal is not None:
            print(f"parallel.py: stopped by {signal.Signals(self.signal).name}; every lane has "
                  f"ended (finished members are kept: run this again to go on)", file=sys.stderr)
            sys.exit(128 + self.signal)

    @contextlib.contextmanager
    def handling_signals(self) -> Iterator["Lanes"]:
        """Install :meth:`stop` for SIGTERM and SIGINT (main thread only), restore on exit."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self.stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _killpg(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)  # its own session: the group id is its pid
    except (ProcessLookupError, PermissionError):
        pass  # the group has ended already


def run_lanes(chains: Sequence[Sequence[str]], *, jobs: int, gpus: Sequence[str], logs: Path,
              dry_run: bool = False, lanes: Lanes | None = None, board: Board | None = None,
              lane_state: Callable[..., LaneState] | None = None) -> None:
    """``dvc --wait-for-lock repro -s STAGE`` for the stages of every chain in order, ``jobs``
    chains at a time, run by ``lanes`` (after a signal: no new chain, wait for the running).

    ``board`` with ``lane_state(lane=, chain=, log=)``: each running chain's live line
    (:mod:`pipeline.launch.progress`); the lanes' messages then go through the board."""
    if not chains:
        return
    lanes = lanes or Lanes()
    say = board.print if board is not None else (lambda message: print(message, flush=True))
    cores = os.cpu_count() or 1
    if not dry_run:
        logs.mkdir(parents=True, exist_ok=True)
    free = list(range(jobs))
    lock = threading.Lock()

    def one(chain: Sequence[str]) -> tuple[str, int, float]:
        with lock:
            lane = free.pop(0)
        env = lane_env(lane, jobs=jobs, gpus=gpus, cores=cores)
        start, code = time.monotonic(), 0
        try:
            # One dvc process per chain: ``repro -s`` runs its targets in the order given and
            # stops at the first failure; DVC re-takes the lock (waiting) between stages.
            cmd = dvc_command("--wait-for-lock", "repro", "-s", *chain)
            if dry_run:
                with lock:
                    print(f"  lane {lane}: {shlex.join(cmd[2:])}", flush=True)
                return chain[-1], 0, 0.0
            path = log_path(logs, chain[-1])
            with open(path, "w") as log:
                log.write(f"$ {shlex.join(cmd[2:])}\n")
                log.flush()
                if board is not None and lane_state is not None:
                    board.add(lane_state(lane=lane, chain=chain, log=path))
                code = lanes.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            return chain[-1], code, time.monotonic() - start
        finally:
            if board is not None:
                board.remove(lane)
            with lock:
                free.append(lane)

    todo, running, failed = list(chains), set(), []
    done = 0
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while todo or running:
            while todo and len(running) < jobs and not failed and lanes.signal is None:
                running.add(pool.submit(one, todo.pop(0)))
            if not running:
                break
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                target, code, seconds = future.result()
                done += 1
                with lock:  # not in the middle of a dry run's line
                    say(f"[{done}/{len(chains)}] {target}: "
                        f"{'ok' if code == 0 else f'FAILED (exit {code})'} in {seconds:.0f} s")
                if code:
                    failed.append(target)
    if board is not None:
        board.draw()  # no lane left: clear the board before others write
    lanes.exit_if_stopped()
    if failed:
        log = log_path(logs, failed[0])
        tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
        print("\n".join(f"  | {line}" for line in tail), file=sys.stderr)
        raise PipelineError(f"{log}: {', '.join(failed)} failed; fix it and run this again "
                            f"(finished members are kept)")
