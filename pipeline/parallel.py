"""Run the chain with independent members side by side: ``dvc repro`` in lanes.

    python pipeline/parallel.py [--jobs 2] [--gpus 0,1] [--dry-run]

What it writes and guarantees: :mod:`pipeline.launch.lanes`.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Sequence

from pipeline.core.errors import PipelineError, run_cli
from pipeline.core.runs import load_train_params
from pipeline.launch.lanes import Lanes, dvc_command, member_targets, run_lanes


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="members running at once")
    parser.add_argument("--gpus", default="", help="comma-separated GPU ids, one per lane")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--logs", default="logs")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise PipelineError(f"--jobs must be >= 1, got {args.jobs}")
    gpus = [g for g in args.gpus.split(",") if g.strip()]
    train = load_train_params(args.params)
    teachers, pupils = member_targets(models=train.models, students=train.students,
                                      folds=train.folds, seeds=train.seeds,
                                      student_seeds=train.student_seeds)
    steps = [("prepare and folds", [dvc_command("repro", "folds")]), ("members", teachers),
             ("students", pupils), ("the rest", [dvc_command("repro")])]
    with Lanes().handling_signals() as lanes:
        for title, work in steps:
            if not work:
                continue
            print(f"== {title}", flush=True)
            if title in ("members", "students"):
                run_lanes(work, jobs=args.jobs, gpus=gpus, logs=Path(args.logs),
                          dry_run=args.dry_run, lanes=lanes)
            elif args.dry_run:
                print(f"  {shlex.join(work[0][2:])}")
            else:
                code = lanes.call(work[0])
                lanes.exit_if_stopped()
                if code != 0:
                    raise PipelineError(f"`{shlex.join(work[0][2:])}` failed (see above)")


if __name__ == "__main__":
    run_cli(main)
