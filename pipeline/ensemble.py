"""Hierarchical ensemble: fit the group weights on out-of-fold maps, then fuse the test maps.

    python pipeline/ensemble.py --search [--oof oof_preds] [--data data] [--out ensemble]
                                         [--folds folds/folds.csv] [--params params.yaml]
    python pipeline/ensemble.py --apply  [--oof oof_preds] [--data data] [--out ensemble]

Fits on the OOF maps of the members the params define, writes weights.json, metrics.json,
members.json, heatmap.png (on the frames ``infer.oof_sample`` samples); ``--apply`` fuses the test maps with those weights and never fits
anything on test data. The method, its files and its guarantees: :mod:`pipeline.ensembling`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pipeline.core.errors import PipelineError, run_cli
from pipeline.core.names import BEST_SINGLE
from pipeline.core.params import load_section
from pipeline.data.oof_sample import load_oof_sample
from pipeline.ensembling import fusion
from pipeline.ensembling.apply import apply_ensemble
from pipeline.ensembling.holdout import TEST_SCORES, score_test
from pipeline.ensembling.outputs import WEIGHTS, format_table, pct
from pipeline.ensembling.params import model_families, params_members, parse_grid, parse_groups
from pipeline.ensembling.search import search_ensemble


@dataclass
class EnsembleParams:
    """The ``ensemble:`` section of params.yaml."""

    groups: Any = None           # auto (None / "auto") or {S: [members], W: [...], A: [...]}
    primary_family: str = "primary"
    n_strong: int = 3            # auto: top primary members that form S; the rest are W
    n_aux: int = 0               # auto: keep the top n_aux auxiliary members in A (0 = all)
    alpha_grid: Any = None       # list of weights or {start, stop, step}; None = 0..2 step 0.1
    beta_grid: Any = None
    full_size: bool = False      # score strided maps upsampled (else on the stored grid)
    chunk_frames: int = 32       # frames per parallel task (bounds memory)
    workers: int = 2             # joblib processes
    allow_partial: bool = False  # fit on OOF maps that cover only part of the train frames
    fallback: str = BEST_SINGLE  # best_single | none: when the fused row is below the best member
    full_data_weight: float = 0.0  # share of a member's test map given to its --fold all run


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--search", action="store_true", help="fit alpha, beta on the OOF maps")
    mode.add_argument("--apply", action="store_true", help="fuse the test maps with weights.json")
    parser.add_argument("--oof", default="oof_preds", help="members' maps (default: oof_preds)")
    parser.add_argument("--data", default="data", help="manifest.csv and classes.json")
    parser.add_argument("--out", default="ensemble")
    parser.add_argument("--folds", default="folds/folds.csv",
                        help="the train frames the OOF maps must cover (id, video, fold)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    params = load_section(EnsembleParams, "ensemble", args.params)
    if params.workers < 1 or params.chunk_frames < 1:
        raise PipelineError(f"{args.params}: ensemble.workers and ensemble.chunk_frames must "
                            f"be >= 1")
    common = {"oof_root": Path(args.oof), "data_dir": Path(args.data), "out_dir": Path(args.out),
              "workers": params.workers, "chunk_frames": params.chunk_frames,
              "progress": not args.no_progress}
    if args.apply:
        result = apply_ensemble(**common)
        how = (f"best single member {result['groups']['S'][0]}, the search's fallback"
               if result["fallback"] else f"alpha={result['alpha']:g}, beta={result['beta']:g}")
        print(f"fused {result['frames']} test frames ({how}) -> {result['out']}")
        scores = score_test(**common)
        if scores["labelled_frames"]:
            print(f"test split ({scores['labelled_frames']} labelled frames): submitted mIoU "
                  f"{pct(scores['rows']['submitted'])}, best single member "
                  f"{pct(scores['rows']['best_single'])} -> {Path(args.out) / TEST_SCORES}")
        return result
    source = str(args.params)
    members = params_members(args.params)
    if members is None:
        print(f"{source}: no train: section; ensembling every member under {args.oof}")
    result = search_ensemble(
        **common, groups=parse_groups(params.groups, source=source),
        families=model_families(args.params), primary_family=params.primary_family,
        n_strong=params.n_strong, n_aux=params.n_aux, full_size=params.full_size,
        alphas=parse_grid(params.alpha_grid, key="alpha_grid", source=source),
        betas=parse_grid(params.beta_grid, key="beta_grid", source=source), params_source=source,
        members=members, folds_path=Path(args.folds), allow_partial=params.allow_partial,
        fallback=params.fallback, full_data_weight=params.full_data_weight,
        oof_sample=load_oof_sample(args.params))
    weights, metrics = result["weights"], result["metrics"]
    fused = weights["fused"]
    for group in fusion.GROUPS:
        print(f"{group}: {', '.join(fused['groups'][group]) or '-'}")
    print(format_table(metrics))
    single = weights[BEST_SINGLE]
    if fused["oof_mIoU"] < single["oof_mIoU"]:
        below = (f"the best fused row (alpha={fused['alpha']:g}, beta={fused['beta']:g}, OOF "
                 f"mIoU {pct(fused['oof_mIoU'])}) is below the best single member "
                 f"{single['member']} ({pct(single['oof_mIoU'])})")
        if weights["fallback"]:
            print(f"fallback: {below}; weights.json selects {single['member']} alone "
                  f"(ensemble.fallback: none keeps the fused row)")
        else:
            print(f"warning: {below}; kept (ensemble.fallback: none)", file=sys.stderr)
    print(f"alpha={weights['alpha']:g} beta={weights['beta']:g}: OOF mIoU "
          f"{pct(weights['oof_mIoU'])} -> {Path(args.out) / WEIGHTS}")
    return result


if __name__ == "__main__":
    run_cli(main)
