"""The names of things on disk and in tables, each defined once and imported everywhere else.

A run folder is ``<model>_f<fold>_s<seed>`` (fold ``all`` trains on every frame), a member (a
model and a seed, over its folds) is ``<model>_s<seed>``, its maps sit in ``f<fold>/`` folders,
and every stage writes a small metrics JSON under a fixed name. The report finds its sections by
these names, so a change here is seen by every reader at once instead of silently skipped.
"""

from __future__ import annotations

import numbers
import re

from pipeline.core.errors import PipelineError

ALL_FOLDS = "all"                      # the "fold" that trains on every id and validates on none
MANIFEST_SPLITS = ("train", "test")    # a frame's split in data/manifest.csv
MAP_SPLITS = ("oof", "test")           # the probability maps a run writes (out-of-fold, test)

# files a run folder holds beside its checkpoints (see pipeline.core.runs.RunPaths)
METRICS_FILE = "metrics.json"          # training's result, also the ensemble folder's
SWA_METRICS_FILE = "swa_metrics.json"
INFER_METRICS_FILE = "infer_metrics.json"
MAP_META_FILE = "meta.json"            # beside a run's oof/ and test/ maps
HEADLINE_FILE = "metrics.json"         # the workspace's headline scores (the report stage's, top level)
EVAL_SUFFIX = ".eval.json"             # evaluate.py's scores beside what it scored (<name>.zip.eval.json)

# rows of the ensemble's table, in the search's order
BEST_SINGLE = "best_single"
UNIFORM_MEAN = "uniform_mean"
ENSEMBLE_ROWS = (BEST_SINGLE, UNIFORM_MEAN, "S", "S_W", "S_W_A")

RUN_DIR = re.compile(r"^(?P<model>.+)_f(?P<fold>\d+|all)_s(?P<seed>\d+)$")


def run_name(model: str, fold: int | str, seed: int) -> str:
    """The run folder of one model x fold x seed: ``<model>_f<fold>_s<seed>``."""
    return f"{model}_f{fold}_s{seed}"


def parse_run_name(name: str) -> tuple[str, int | str, int] | None:
    """(model, fold, seed) of a run folder name, or None when ``name`` is not one."""
    match = RUN_DIR.match(name)
    if not match:
        return None
    fold = match["fold"] if match["fold"] == ALL_FOLDS else int(match["fold"])
    return match["model"], fold, int(match["seed"])


def member_name(model: str, seed: int) -> str:
    """A member of the ensemble: one model config and seed over its folds, ``<model>_s<seed>``."""
    return f"{model}_s{seed}"


def fold_dir_name(fold: int | str) -> str:
    """``f<fold>``: the folder of one run's maps inside its member's folder."""
    if fold != ALL_FOLDS and not (isinstance(fold, numbers.Integral) and not isinstance(fold, bool)
                                  and fold >= 0):
        raise PipelineError(f"fold must be a number >= 0 or '{ALL_FOLDS}', got {fold!r}")
    return f"f{fold}"
