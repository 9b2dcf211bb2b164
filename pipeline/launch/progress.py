"""Live progress of the lanes: one line per running member, updated while it trains.

``make run`` used to print "== members" and then nothing for minutes. :class:`Board` shows
one line per lane: the member's run, its current stage, iteration / total, the last
validation mIoU and an ETA, e.g.::

    lane 0  unet_r10_f0_s1  train  220/440  val 41.2  ETA 1m52s
    lane 1  fpn_r10_f1_s0   infer  0m31s

The facts come from files the stages already write, so nothing in training changes: the
stage from the last ``Running stage '...'`` line DVC wrote to the lane's log, the iteration
and the mIoU from the last rows of the run's DVCLive curves (:mod:`pipeline.core.curves`).
The ETA is the remaining iterations at the rate seen since the board first saw this stage (a
resumed run's earlier iterations do not count).

On a terminal the lines are redrawn in place about once a second; into a log (stdout not a
terminal) the same lines are printed as plain text every ``interval`` seconds, and messages
printed through :meth:`Board.print` never interleave with them. The per-lane log files stay
as they were (``logs/<target>.log``).
"""

from __future__ import annotations

import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence, TextIO

from pipeline.core.curves import TRAIN, VAL, curve_path, last_value, tail_text
from pipeline.core.names import parse_run_name, run_name
from pipeline.core.runs import RunPaths, TrainParams, load_model_params

STAGE_LINE = re.compile(r"Running stage '([^'@]+)@")
TRAINING_STAGES = ("train", "students")   # the stages that write curves as they go
TTY_INTERVAL = 1.0                          # seconds between redraws on a terminal
LOG_INTERVAL = 60.0                         # seconds between plain progress lines in a log


def chain_run(chain: Sequence[str], *, students: Sequence[Mapping], runs_dir: Path) -> Path:
    """The run folder a member chain trains (``train@<model>-<fold>-<seed>`` or
    ``students@student<i>-<fold>-<seed>``, see :func:`pipeline.launch.lanes.member_targets`)."""
    stage, key = chain[0].split("@", 1)
    name, fold, seed = key.rsplit("-", 2)
    if stage == "students":
        name = str(students[int(name.removeprefix("student"))]["name"])
    return runs_dir / run_name(name, int(fold), int(seed))


def current_stage(log: Path) -> str | None:
    """The stage DVC last started in a lane's log (``train``, ``swa``, ``infer``, ...)."""
    found = STAGE_LINE.findall(tail_text(log, 1 << 16))
    return found[-1] if found else None


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s"


@dataclass
class LaneState:
    """One running member chain: its lane, its lane log, its run folder and its iterations."""

    lane: int
    log: Path
    run_dir: Path
    total: int                       # training iterations of the run (main schedule + SWA)
    started: float = field(default_factory=time.monotonic)
    _stage: str | None = None
    _stage_start: float = 0.0
    _first: tuple[int, float] | None = None   # (iteration, time) first seen in this stage

    def line(self, now: float | None = None) -> str:
        """``lane N  <run>  <stage>  it/total  val X  ETA ...`` (what is known so far)."""
        now = time.monotonic() if now is None else now
        stage = current_stage(self.log) or "waiting"
        if stage != self._stage:
            self._stage, self._stage_start, self._first = stage, now, None
        parts = [f"lane {self.lane}", self.run_dir.name, stage]
        if stage not in TRAINING_STAGES:
            return "  ".join(parts + [_clock(now - self._stage_start)])
        curves = RunPaths(self.run_dir).curves
        logged = last_value(curve_path(curves, TRAIN, "loss"))
        it = logged[0] if logged else 0
        parts.append(f"{it}/{self.total}")
        val = last_value(curve_path(curves, VAL, "miou"))
        if val:
            parts.append(f"val {100 * val[1]:.1f}")
        if self._first is None and it:
            self._first = (it, now)
        elif self._first and it > self._first[0] and now > self._first[1]:
            rate = (it - self._first[0]) / (now - self._first[1])
            parts.append(f"ETA {_clock((self.total - it) / rate)}")
        return "  ".join(parts)


class Board:
    """The lanes' live lines on ``stream``: redrawn in place on a terminal, plain lines every
    ``interval`` seconds otherwise. Use as a context manager (a drawing thread runs inside)."""

    def __init__(self, *, stream: TextIO | None = None, tty: bool | None = None,
                 interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval if interval is not None else (
            TTY_INTERVAL if self.tty else LOG_INTERVAL)
        self.clock = clock
        self.lanes: dict[int, LaneState] = {}
        self._drawn = 0                 # lines of the board on the terminal now
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, state: LaneState) -> None:
        with self._lock:
            self.lanes[state.lane] = state

    def remove(self, lane: int) -> None:
        with self._lock:
            self.lanes.pop(lane, None)

    def lines(self) -> list[str]:
        now = self.clock()
        with self._lock:
            return [self.lanes[k].line(now) for k in sorted(self.lanes)]

    def _clear(self) -> None:
        if self.tty and self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")  # up to the board's first line, erase
            self._drawn = 0

    def draw(self) -> None:
        """Write the board once: in place on a terminal, as plain ``progress:`` lines otherwise."""
        with self._lock:
            lines = self.lines()
            self._clear()
            if self.tty:
                self.stream.write("".join(f"{line}\n" for line in lines))
                self._drawn = len(lines)
            else:
                self.stream.write("".join(f"  progress: {line}\n" for line in lines))
            self.stream.flush()

    def print(self, message: str) -> None:
        """Print a message above the board (never in the middle of it)."""
        with self._lock:
            self._clear()
            self.stream.write(f"{message}\n")
            if self.tty:
                self.draw()
            else:
                self.stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.lanes or self._drawn:  # the last draw's lines go once their lanes are done
                self.draw()

    def __enter__(self) -> "Board":
        self._thread = threading.Thread(target=self._run, name="progress-board", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self._clear()
            self.stream.flush()


def lane_states(train: TrainParams, *, params_path: str | Path) -> Callable[..., LaneState]:
    """``lane_state(lane=, chain=, log=)`` for the progress board: the chain's run folder and
    its training iterations (main schedule + SWA phase) from params."""
    runs_dir = Path(train.runs_dir)

    def state(*, lane: int, chain: Sequence[str], log: Path) -> LaneState:
        run_dir = chain_run(chain, students=train.students, runs_dir=runs_dir)
        cfg = load_model_params(parse_run_name(run_dir.name)[0], params_path)
        return LaneState(lane=lane, log=log, run_dir=run_dir,
                         total=cfg.model.iters + cfg.swa.iters)
    return state
