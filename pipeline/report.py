"""Stage: figures and the end-of-run summary for a person, from what the chain wrote.

    python pipeline/report.py [--runs runs] [--oof oof_preds] [--ensemble ensemble]
                              [--submissions submissions] [--data data] [--out reports]
                              [--name submission] [--params params.yaml]

Writes ``<out>/`` as a whole (training curves, per-class IoU, confusion matrix, ensemble heatmap,
overlays, ``summary.md``, ``summary.json``; see :mod:`pipeline.reporting.summary`), the headline
``metrics.json`` (``--headline``, :mod:`pipeline.reporting.headline`) and prints the summary.
Parts whose inputs are missing are skipped with a note; no training run at all is an error.
The stage has no params.yaml section of its own: it reads results, and ``models:`` of the
params file (when present) to find students' teachers and configs that differ in one switch
for the technique ledger.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from pipeline.core.errors import run_cli
from pipeline.core.names import HEADLINE_FILE
from pipeline.core.params import read_params
from pipeline.reporting.headline import write_headline
from pipeline.reporting.summary import build_report, format_summary


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs", help="training runs <model>_f<K>_s<S>/")
    parser.add_argument("--oof", default="oof_preds", help="members' maps and meta.json")
    parser.add_argument("--ensemble", default="ensemble", help="the ensemble stage's outputs")
    parser.add_argument("--submissions", default="submissions")
    parser.add_argument("--data", default="data", help="manifest.csv and classes.json")
    parser.add_argument("--out", default="reports")
    parser.add_argument("--name", default="submission", help="submission name (submit.name)")
    parser.add_argument("--params", default="params.yaml",
                        help="its models: section feeds the technique ledger (absent: skipped)")
    parser.add_argument("--headline", default=HEADLINE_FILE,
                        help="the headline scores (cv_miou, cv_mvc8, test_miou...) for dvc exp show")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    models = read_params(args.params).get("models") if Path(args.params).is_file() else None
    summary = build_report(runs_dir=args.runs, oof_dir=args.oof, ensemble_dir=args.ensemble,
                           submissions_dir=args.submissions, data_dir=args.data, out_dir=args.out,
                           name=args.name, models=models, progress=not args.no_progress)
    write_headline(args.headline, ensemble_dir=args.ensemble, submissions_dir=args.submissions,
                   name=args.name)
    print(format_summary(summary), end="")
    return summary


if __name__ == "__main__":
    run_cli(main)
