"""Hierarchical ensemble: fit the group weights on out-of-fold maps, then fuse the test maps.

    python pipeline/ensemble.py --search [--oof oof_preds] [--data data] [--out ensemble]
                                         [--folds folds/folds.csv] [--params params.yaml]
    python pipeline/ensemble.py --apply  [--oof oof_preds] [--data data] [--out ensemble]

The members are exactly those the params define: ``<model>_s<seed>`` of train.models x
train.seeds and of train.students x train.student_seeds (maps of other members under
``oof_preds/`` are ignored, said in one line; a defined member without maps is an error). Their
OOF maps must cover every train frame of folds.csv (``ensemble.allow_partial: true`` fits on
the covered ones and says so in metrics.json and the table), and their meta.json must
record the class names of data/classes.json, in order.

Members (``oof_preds/<model>_s<seed>/``) form three groups: strong S and weak W (members of the
primary family, ranked by OOF mIoU: the top ``n_strong`` are S) and auxiliary A (other
families), or the lists given in ``ensemble.groups``. The fused map is P_S + alpha P_W +
beta P_A (VSPW 2021, 5th place: 57.26 best single -> 58.01 P_S -> 58.50 +W -> 61.10 +A).

``--search`` scores every (alpha, beta) of the grid in one streaming pass over the OOF maps
(:func:`pipeline.ensembling.fusion.score_pass`, which also scores the best member and the uniform mean),
then records them in an Optuna study, one complete trial per grid point in grid order; the
study lives in ``<out>/study.db`` (SQLite) and resumes. The fused rows of the table (P_S,
P_S + alpha P_W, the best point) need label maps for their video consistency: the grid pass
leaves compact label records (temporary, under ``<out>``) from which they are rebuilt exactly,
on the workers while the study runs, without reading a map again. Members are ranked by the
OOF confusion matrices that inference stores in meta.json ("oof_cm_tta"; checked against the
maps: every member's ground-truth counts, and the best member's matrix in full), or else by a
pass of their own (auto groups) or in the grid pass (explicit groups). A search killed at any
point resumes to the same outputs: the study keeps each grid point once, weights.json comes last.
A study of other inputs is replaced only once the new one is complete (built in a work file
beside it). One search at a time writes ``<out>``: it holds ``<out>/.search.lock``.
Fallback: when the best fused row scores below the best single member OOF,
``ensemble.fallback: best_single`` (the default) makes weights.json select that member alone
(``"fallback": "best_single"``, both scores recorded), so the submission is never worse out of
fold than its best member; ``none`` keeps the fused row with a warning.
Test maps of a member: the mean of its k fold models (the models its OOF maps measured). A
``--fold all`` run (trained on every train frame, no OOF map) is not counted as one more fold
model: it gets the separate weight ``ensemble.full_data_weight`` (default 0: not used) and the
fold models share the rest; each member's ``test_weights`` ({"f0": .., "fall": ..}) are
recorded in weights.json and members.json.
Outputs: ``weights.json`` (groups, alpha, beta, grid, score, input fingerprint),
``metrics.json`` (the ensemble table on OOF: flat ``<row>_mIoU`` / ``_mVC8`` / ``_mVC16`` keys),
``members.json`` (OOF mIoU, family and group of each member), ``heatmap.png`` and
``grid_scores.npz`` (the passes' results, reused while the inputs' fingerprint is unchanged).
``--apply`` fuses the test maps with the saved weights into ``<out>/test_pred/<id>.png``: it
never fits anything on test data. Where test frames have masks, it then scores every member
and row of the table on them with the OOF-fitted weights (``<out>/test_scores.json``, see
:mod:`pipeline.ensembling.holdout`), for the technique ledger.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pipeline.core.names import BEST_SINGLE
from pipeline.ensembling import fusion
from pipeline.core.params import load_section
from pipeline.ensembling.search import (WEIGHTS, apply_ensemble, format_table, model_families,
                                 params_members, parse_grid, parse_groups, pct, search_ensemble)
from pipeline.core.errors import PipelineError, run_cli
from pipeline.ensembling.holdout import TEST_SCORES, score_test


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
        fallback=params.fallback, full_data_weight=params.full_data_weight)
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
