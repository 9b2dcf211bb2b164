"""Tests for pipeline/launch/progress.py: the lanes' live lines read the files stages write."""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import yaml

from pipeline.core.curves import TRAIN, VAL
from pipeline.core.runs import RunPaths, load_train_params
from pipeline.launch.lanes import run_lanes
from pipeline.launch.progress import Board, LaneState, chain_run, current_stage, lane_states

from conftest import REPO  # the repository root, defined once
from test_curves import write_curve


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _lane(tmp_path: Path, *, total: int = 400) -> LaneState:
    run_dir = tmp_path / "runs" / "unet_r10_f0_s1"
    run_dir.mkdir(parents=True)
    log = tmp_path / "lane.log"
    log.write_text("$ dvc repro -s train@unet_r10-0-1 swa@unet_r10-0-1\n")
    return LaneState(lane=1, log=log, run_dir=run_dir, total=total)


def _log_iters(run_dir: Path, *iters: int) -> None:
    write_curve(RunPaths(run_dir).curves, TRAIN, "loss", [(it, 1.5) for it in iters])


def test_a_lane_line_shows_stage_iteration_val_and_an_eta_from_the_rate_seen(tmp_path):
    lane = _lane(tmp_path)
    assert lane.line(now=0.0) == "lane 1  unet_r10_f0_s1  waiting  0m00s"
    with lane.log.open("a") as fh:
        fh.write("Running stage 'train@unet_r10-0-1':\n> python pipeline/train.py ...\n")
    assert lane.line(now=1.0) == "lane 1  unet_r10_f0_s1  train  0/400"
    _log_iters(lane.run_dir, 10, 20, 100)
    first = lane.line(now=10.0)
    assert "100/400" in first and "ETA" not in first  # one observation: no rate yet
    _log_iters(lane.run_dir, 10, 20, 100, 200)
    write_curve(RunPaths(lane.run_dir).curves, VAL, "miou", [(200, 0.41234)])
    line = lane.line(now=60.0)  # 100 iterations in 50 s: 200 left take 100 s
    assert line == "lane 1  unet_r10_f0_s1  train  200/400  val 41.2  ETA 1m40s"


def test_a_new_stage_restarts_the_clock_and_drops_the_rate(tmp_path):
    lane = _lane(tmp_path)
    lane.log.write_text("Running stage 'train@unet_r10-0-1':\n")
    _log_iters(lane.run_dir, 400)
    lane.line(now=0.0)
    with lane.log.open("a") as fh:
        fh.write("Running stage 'swa@unet_r10-0-1':\n")
    assert lane.line(now=30.0) == "lane 1  unet_r10_f0_s1  swa  0m00s"
    assert lane.line(now=95.0) == "lane 1  unet_r10_f0_s1  swa  1m05s"
    assert current_stage(lane.log) == "swa"


def test_chain_run_names_the_run_folder_of_teachers_and_students(tmp_path):
    students = [{"name": "unet_r10_kd", "teacher": "unet_r10"}]
    assert chain_run(["train@fpn_r10-1-0", "swa@fpn_r10-1-0"], students=students,
                     runs_dir=tmp_path) == tmp_path / "fpn_r10_f1_s0"
    assert chain_run(["students@student0-0-3"], students=students,
                     runs_dir=tmp_path) == tmp_path / "unet_r10_kd_f0_s3"


def test_lane_states_count_the_main_schedule_and_the_swa_phase():
    train = load_train_params(REPO / "params.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    model = train.models[0]
    state = lane_states(train, params_path=REPO / "params.yaml")(
        lane=0, chain=[f"train@{model}-0-0"], log=Path("x.log"))
    cfg = params["models"][model]
    assert state.total == cfg["iters"] + (cfg.get("swa") or {}).get("iters", 0)
    assert state.run_dir == Path(train.runs_dir) / f"{model}_f0_s0"


def test_board_redraws_in_place_on_a_terminal(tmp_path):
    out, clock = io.StringIO(), Clock()
    board = Board(stream=out, tty=True, clock=clock)
    lane = _lane(tmp_path)
    board.add(lane)
    board.draw()
    board.draw()
    board.print("[1/4] infer@x: ok in 3 s")
    text = out.getvalue()
    # each redraw moves up over the previous board's one line and erases it
    assert text.count("\x1b[1F\x1b[J") == 2
    assert text.endswith("[1/4] infer@x: ok in 3 s\nlane 1  unet_r10_f0_s1  waiting  0m00s\n")
    board.remove(1)
    board.draw()
    assert out.getvalue().endswith("\x1b[1F\x1b[J")  # no lane: the board is erased


def test_board_writes_plain_lines_into_a_log(tmp_path):
    out = io.StringIO()
    board = Board(stream=out, tty=False, clock=Clock())
    board.add(_lane(tmp_path))
    board.draw()
    board.print("== members")
    assert out.getvalue() == ("  progress: lane 1  unet_r10_f0_s1  waiting  0m00s\n"
                              "== members\n")
    assert "\x1b" not in out.getvalue()


def test_the_board_thread_draws_while_lanes_run(tmp_path):
    out = io.StringIO()
    with Board(stream=out, tty=False, interval=0.01) as board:
        board.add(_lane(tmp_path))
        for _ in range(500):
            if "progress:" in out.getvalue():
                break
            time.sleep(0.01)
    assert "progress: lane 1  unet_r10_f0_s1" in out.getvalue()


def test_run_lanes_reports_through_the_board_and_keeps_the_lane_logs(tmp_path, monkeypatch):
    """A fake dvc (a script) runs in the lanes: each chain's log is kept and the board sees it."""
    seen: list[int] = []
    out = io.StringIO()
    board = Board(stream=out, tty=False, interval=3600)

    def state(*, lane, chain, log):
        seen.append(lane)
        return LaneState(lane=lane, log=log, run_dir=tmp_path / "runs" / "m_f0_s0", total=10)

    fake = tmp_path / "fakedvc.py"
    fake.write_text("import sys\nprint('Running stage ' + repr(sys.argv[-1]))\n")
    monkeypatch.setattr("pipeline.launch.lanes.dvc_command",
                        lambda *args: [sys.executable, str(fake), *args])
    with board:
        run_lanes([["train@m-0-0"], ["train@m-1-0"]], jobs=2, gpus=[], logs=tmp_path / "logs",
                  board=board, lane_state=state)
    assert sorted(seen) == [0, 1] and not board.lanes
    assert "[2/2]" in out.getvalue()
    assert (tmp_path / "logs" / "train_m-0-0.log").read_text().count("Running stage") == 1
