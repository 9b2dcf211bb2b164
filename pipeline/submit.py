"""Stage: pack the test predictions into a checked, deterministic submission zip.

    python pipeline/submit.py [--pred ensemble/test_pred] [--data data] [--name NAME] [--format F]
                              [--vspw-offset 0|1] [--out submissions] [--weights ensemble/weights.json]
                              [--rle-order column|row] [--previews N] [--params params.yaml]

What it writes and guarantees: :mod:`pipeline.submission.packing`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from pipeline.core.errors import run_cli
from pipeline.core.params import DEFAULT_PARAMS, build_section, load_section
from pipeline.submission.packing import make_submission


@dataclass
class RleParams:
    """``submit.rle``: the ``rle_csv`` format's encoding."""

    order: str = "column"       # pixel numbering: column (Kaggle's, top to bottom first) | row


@dataclass
class SubmitParams:
    """The ``submit:`` section of params.yaml."""

    name: str = "submission"
    format: str = "auto"        # auto | folder | camvid | cityscapes | vspw | rle_csv
    vspw_offset: int = 0        # vspw only: 0 = train ids 0..123 (official eval), 1 = stored ids 1..124
    rle: dict = field(default_factory=dict)  # rle_csv only: RleParams
    previews: int = 4


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Pack test predictions into a checked submission zip.")
    parser.add_argument("--pred", default="ensemble/test_pred", help="folder of <id>.png train-id maps")
    parser.add_argument("--data", default="data", help="folder of manifest.csv and classes.json")
    parser.add_argument("--name", default=None, help="override submit.name")
    parser.add_argument("--format", default=None, help="override submit.format")
    parser.add_argument("--vspw-offset", type=int, default=None, help="override submit.vspw_offset")
    parser.add_argument("--rle-order", default=None, help="override submit.rle.order (column | row)")
    parser.add_argument("--previews", type=int, default=None, help="override submit.previews")
    parser.add_argument("--out", default="submissions")
    parser.add_argument("--weights", default="ensemble/weights.json",
                        help="ensemble weights copied into the JSON when present")
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    params = load_section(SubmitParams, "submit", args.params, overrides={
        "name": args.name, "format": args.format, "vspw_offset": args.vspw_offset, "previews": args.previews})
    rle_values = {**(params.rle or {}), **({"order": args.rle_order} if args.rle_order else {})}
    rle = build_section(RleParams, rle_values, section="submit.rle", source=str(args.params))
    summary = make_submission(pred_dir=args.pred, data=args.data, out_dir=args.out, name=params.name,
                              fmt=params.format, vspw_offset=params.vspw_offset, rle_order=rle.order,
                              weights=args.weights, previews=params.previews,
                              progress=not args.no_progress, params=args.params)
    print(f"wrote {Path(args.out) / summary['zip']}: {summary['frames']} frames, format {summary['format']}, "
          f"sha256 {summary['sha256'][:16]}...")
    return summary


if __name__ == "__main__":
    run_cli(main)
