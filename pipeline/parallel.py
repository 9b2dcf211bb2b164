"""Run the chain with independent members side by side: ``dvc repro`` in lanes.

    python pipeline/parallel.py [--jobs 2] [--gpus 0,1] [--dry-run] [--no-disk-check]
    python pipeline/parallel.py --launcher slurm     # members as a Slurm job array
    python pipeline/parallel.py --plan [--probe] [--json FILE]
        [--frames N --height H --width W --classes C --test-frames M --videos V]

What it writes and guarantees: :mod:`pipeline.launch.lanes` (on a cluster:
:mod:`pipeline.launch.slurm`). Before the members start it refuses
(exit 2) when the maps of the cost plan exceed the free disk of ``infer.out``. ``--plan`` prints
that plan (runs, training images, TTA passes, checkpoint, snapshot and map bytes, device-hours)
and runs nothing: from data/manifest.csv when prepared, else from the ``--frames ...`` numbers
(a dataset not prepared yet), else the params-only numbers. How it counts:
:mod:`pipeline.launch.plan`.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Sequence

from pipeline.core.atomic import write_json
from pipeline.core.errors import PipelineError, run_cli
from pipeline.core.runs import load_train_params
from pipeline.launch.costs import human_bytes
from pipeline.launch.inputs import plan_from_params
from pipeline.launch.lanes import Lanes, dvc_command, member_targets, run_lanes
from pipeline.launch.plan import check_map_disk
from pipeline.launch.progress import Board, lane_states
from pipeline.launch.slurm import load_slurm_params, run_array
from pipeline.launch.table import format_plan

GIVEN = ("frames", "test_frames", "height", "width", "classes", "videos")  # --plan's overrides


def disk_check(args: argparse.Namespace) -> bool:
    """Refuse when the planned maps exceed the free disk; False when the data is not there yet."""
    plan = plan_from_params(params_path=args.params, data_dir=args.data, folds_path=args.folds,
                            with_models=False)
    need = plan["total"]["map_bytes"]
    if need is None:
        return False
    free = check_map_disk(map_bytes=need, folder=plan["disk"]["out"])
    print(f"== disk: maps up to {human_bytes(need)} (before compression), "
          f"{human_bytes(free)} free at {plan['disk']['checked_at']}", flush=True)
    return True


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="members running at once")
    parser.add_argument("--gpus", default="", help="comma-separated GPU ids, one per lane")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data", help="prepared data (manifest.csv)")
    parser.add_argument("--folds", default="folds/folds.csv")
    parser.add_argument("--logs", default="logs")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local",
                        help="members in local lanes, or as a Slurm job array (launch.slurm)")
    parser.add_argument("--no-disk-check", action="store_true",
                        help="start even when the planned maps exceed the free disk")
    parser.add_argument("--plan", action="store_true", help="print the cost plan, run nothing")
    parser.add_argument("--probe", action="store_true",
                        help="with --plan: time each model on train.device for device-hours")
    parser.add_argument("--json", default=None, help="with --plan: also write it to this file")
    for name in GIVEN:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help="with --plan: the dataset's numbers instead of data/")
    args = parser.parse_args(argv)
    given = {name: getattr(args, name) for name in GIVEN if getattr(args, name) is not None}
    if args.plan:
        plan = plan_from_params(params_path=args.params, data_dir=args.data,
                                folds_path=args.folds, probe=args.probe, **given)
        print(format_plan(plan))
        if args.json:
            write_json(args.json, plan)
        return
    if given or args.probe or args.json:
        raise PipelineError("--probe, --json and the dataset numbers (--frames ...) go with --plan")
    if args.jobs < 1:
        raise PipelineError(f"--jobs must be >= 1, got {args.jobs}")
    gpus = [g for g in args.gpus.split(",") if g.strip()]
    train = load_train_params(args.params)
    slurm = load_slurm_params(args.params) if args.launcher == "slurm" else None
    teachers, pupils = member_targets(models=train.models, students=train.students,
                                      folds=train.folds, seeds=train.seeds,
                                      student_seeds=train.student_seeds)
    checked = args.no_disk_check or disk_check(args)  # else once prepare has made the manifest
    steps = [("prepare and folds", [dvc_command("repro", "folds")]), ("members", teachers),
             ("students", pupils), ("the rest", [dvc_command("repro")])]
    board = Board()
    with Lanes().handling_signals() as lanes, board:
        for title, work in steps:
            if not work:
                continue
            if title != "prepare and folds" and not checked:
                checked = disk_check(args) or args.dry_run
            board.print(f"== {title}")
            if title in ("members", "students") and slurm is not None:
                run_array(work, slurm=slurm, folder=Path(args.logs) / "slurm", dry_run=args.dry_run,
                          say=board.print, stopped=lambda: lanes.signal)
            elif title in ("members", "students"):
                run_lanes(work, jobs=args.jobs, gpus=gpus, logs=Path(args.logs),
                          dry_run=args.dry_run, lanes=lanes, board=board,
                          lane_state=lane_states(train, params_path=args.params))
            elif args.dry_run:
                print(f"  {shlex.join(work[0][2:])}")
            else:
                code = lanes.call(work[0])
                lanes.exit_if_stopped()
                if code != 0:
                    raise PipelineError(f"`{shlex.join(work[0][2:])}` failed (see above)")


if __name__ == "__main__":
    run_cli(main)
