"""What one run trains and validates on: its frames, class table and prior, and its teacher.

:func:`load_run_data` splits the prepared frames by ``folds.csv`` (every fold but ``fold``
trains, ``fold`` validates; ``"all"`` trains on everything and validates on nothing) and sums
the training frames' class pixels into the prior that logit adjustment uses; it keeps each
training frame's class pixels for class-aware sampling (training folds only, like the prior).
:func:`teacher_weights` finds the checkpoint a distillation student learns from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.names import ALL_FOLDS, run_name
from pipeline.core.runs import RunPaths
from pipeline.data.manifest import ClassInfo, Frame


@dataclass
class RunData:
    """The frames a run trains and validates on, and the class prior of its training folds."""

    train_frames: list[Frame]
    val_frames: list[Frame]
    classes: ClassInfo
    prior_counts: np.ndarray  # int64 [C]: pixels per class over the training frames
    train_counts: np.ndarray  # int64 [len(train_frames), C]: each training frame's class pixels


def teacher_weights(teacher: str, *, runs_dir: Path, fold: int | str, seed: int) -> Path:
    """Resolve ``distill.teacher``: a config name (its run of the same fold), a run dir or a file.

    A run's SWA weights are used when present, else its best checkpoint.
    """
    path = Path(teacher)
    if path.suffix == ".pt":
        if not path.is_file():
            raise PipelineError(f"{path}: teacher checkpoint not found")
        return path
    run_dir = path if path.is_dir() else runs_dir / run_name(teacher, fold, seed)
    if not run_dir.is_dir():
        raise PipelineError(f"distill.teacher '{teacher}': run {run_dir} not found; train the "
                            f"teacher first (python pipeline/train.py --model {teacher} "
                            f"--fold {fold} --seed {seed})")
    return RunPaths(run_dir).final_weights()


def load_run_data(*, manifest: Path, classes_path: Path, counts_path: Path, folds_path: Path,
                  fold: int | str) -> RunData:
    """Frames of the training folds (all but ``fold``) and of ``fold``, and the training prior."""
    from pipeline.data.manifest import read_class_counts, read_classes, read_manifest
    from pipeline.data.splits import train_val_ids

    frames = {f.id: f for f in read_manifest(manifest, split="train")}
    train_ids, val_ids = train_val_ids(folds_path, fold)
    missing = [i for i in train_ids + val_ids if i not in frames]
    if missing:
        raise PipelineError(f"{folds_path}: {len(missing)} id(s) not in {manifest} (first: "
                            f"{missing[0]}); re-run `python pipeline/folds.py`")
    if not train_ids:
        raise PipelineError(f"{folds_path}: fold {fold} leaves no frame to train on")
    if fold != ALL_FOLDS and not val_ids:
        raise PipelineError(f"{folds_path}: fold {fold} has no frames")
    classes = read_classes(classes_path)
    ids, counts = read_class_counts(counts_path)
    row = {i: k for k, i in enumerate(ids)}
    rows = [row[i] for i in train_ids if i in row]
    prior = counts[rows].sum(axis=0) if rows else np.zeros(classes.num_classes, dtype=np.int64)
    # a frame missing from the counts holds no class for class-aware sampling (never drawn by one)
    train_counts = np.zeros((len(train_ids), counts.shape[1]), dtype=np.int64)
    train_counts[[k for k, i in enumerate(train_ids) if i in row]] = counts[rows]
    if prior.sum() <= 0:  # would "train" to the end on a loss of 0 and write a best.pt
        raise PipelineError(f"{counts_path}: the {len(train_ids)} training frame(s) of --fold "
                            f"{fold} have no labelled pixel (all void): nothing to learn from; "
                            f"check their masks and the lookup table of {classes_path}")
    return RunData(train_frames=[frames[i] for i in train_ids],
                   val_frames=[frames[i] for i in val_ids], classes=classes, prior_counts=prior,
                   train_counts=train_counts)
