"""Stage: split the train frames into k folds grouped by video, written once to folds/folds.csv.

    python pipeline/folds.py [--manifest data/manifest.csv] [--counts data/class_counts.npz]
                             [--out folds/folds.csv] [--params params.yaml]

Every later stage reads this file (pipeline.data.splits.read_folds / train_val_ids); none re-splits.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pipeline.core.errors import run_cli
from pipeline.core.params import DEFAULT_PARAMS, load_section
from pipeline.data.splits import format_summary, make_folds


@dataclass
class FoldsParams:
    """The ``folds:`` section of params.yaml."""

    n_folds: int = 5
    seed: int = 0


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Split train frames into folds grouped by video.")
    parser.add_argument("--manifest", default="data/manifest.csv")
    parser.add_argument("--counts", default=None,
                        help="class counts (default: class_counts.npz beside the manifest)")
    parser.add_argument("--out", default="folds/folds.csv")
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--n-folds", type=int, default=None, help="override folds.n_folds")
    parser.add_argument("--seed", type=int, default=None, help="override folds.seed")
    args = parser.parse_args(argv)
    params = load_section(FoldsParams, "folds", args.params,
                          overrides={"n_folds": args.n_folds, "seed": args.seed})
    counts = args.counts or Path(args.manifest).parent / "class_counts.npz"
    summary = make_folds(manifest=args.manifest, counts=counts, out=args.out,
                         n_folds=params.n_folds, seed=params.seed)
    print(format_summary(summary))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
