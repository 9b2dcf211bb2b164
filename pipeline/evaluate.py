"""Score predicted label maps against the manifest's masks: mIoU, accuracies, mVC8 and mVC16.

    python pipeline/evaluate.py PRED_DIR|SUBMISSION.zip|TABLE.csv [--manifest data/manifest.csv]
                                [--classes FILE] [--split test] [--out PRED.eval.json]
                                [--format F] [--vspw-offset 0|1] [--rle-order column|row]

What it writes and guarantees: :mod:`pipeline.evaluation.scoring`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pipeline.core import atomic
from pipeline.core.errors import PipelineError, run_cli
from pipeline.core.params import load_section
from pipeline.data.manifest import read_manifest
from pipeline.evaluation.scorecard import format_table
from pipeline.evaluation.scoring import (default_out, evaluate_folder, evaluate_table, evaluate_zip,
                                         input_paths, is_table, is_zip, resolve_classes_path)
from pipeline.submission.sidecar import sidecar_path


@dataclass
class EvaluateParams:
    split: str = "test"
    require_labels: bool = True   # false: a split without labels (a challenge's test) is noted, not an error


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pred", metavar="PRED_DIR|SUBMISSION.zip|TABLE.csv",
                        help="folder of <id>.png label maps, a zip written by submit.py, or an "
                             "id,class,rle CSV")
    parser.add_argument("--manifest", default="data/manifest.csv")
    parser.add_argument("--classes", default=None, help="default: classes.json beside the manifest")
    parser.add_argument("--split", default=None, help="manifest split to score (params: evaluate.split)")
    parser.add_argument("--out", default=None, help="summary JSON (default: <PRED>.eval.json)")
    parser.add_argument("--format", default=None,
                        help="zip only: submission format (default: from <name>.json beside the zip)")
    parser.add_argument("--vspw-offset", type=int, default=None,
                        help="zip only, vspw format: 0 or 1 (default: from <name>.json, else 0)")
    parser.add_argument("--rle-order", default=None,
                        help="rle_csv zip or CSV: column or row (default: from <name>.json, else column)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else default_out(args.pred)
    pred, manifest = Path(args.pred), Path(args.manifest)
    atomic.refuse_overwrite(out, input_paths(pred, manifest, resolve_classes_path(manifest, args.classes),
                                         side=sidecar_path(pred) if is_zip(pred) else None,
                                         params=args.params))
    params = load_section(EvaluateParams, "evaluate", args.params, overrides={"split": args.split})
    if not params.require_labels and not any(
            f.split == params.split and f.mask for f in read_manifest(args.manifest)):
        summary = {"split": params.split, "frames": 0, "mIoU": None, "predictions": str(args.pred),
                   "note": f"split '{params.split}' has no labels here: nothing scored "
                           f"(the challenge's server scores it)"}
        with atomic.output_errors(out):
            atomic.write_json(out, summary)
        print(f"{summary['note']}\nwrote {out}")
        return summary
    if is_table(args.pred):
        if args.format is not None or args.vspw_offset is not None:
            raise PipelineError(f"{args.pred}: --format and --vspw-offset apply to a submission zip only")
        summary = evaluate_table(args.pred, manifest=args.manifest, classes_path=args.classes,
                                 split=params.split, out=out, rle_order=args.rle_order or "column")
    elif is_zip(args.pred):
        summary = evaluate_zip(args.pred, manifest=args.manifest, classes_path=args.classes,
                               split=params.split, out=out, fmt=args.format, vspw_offset=args.vspw_offset,
                               rle_order=args.rle_order)
    else:
        if args.format is not None or args.vspw_offset is not None or args.rle_order is not None:
            raise PipelineError(f"{args.pred}: --format, --vspw-offset and --rle-order apply to a "
                                "submission zip only (--rle-order also to a CSV)")
        summary = evaluate_folder(args.pred, manifest=args.manifest, classes_path=args.classes,
                                  split=params.split, out=out)
    print(format_table(summary))
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    run_cli(main)
