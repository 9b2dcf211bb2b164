"""What a run learned from, as digests its checkpoints carry, and why a checkpoint no longer fits.

A run resumes only what it began: its checkpoints record, beside the config, the digests of
:func:`data_digests` (which frames train and validate, their contents, the class table, the
teacher's weights). :func:`data_change` says in one line what differs, which makes the run start
over; :func:`check_teacher` refuses a distillation teacher that has seen the student's
validation frames.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Sequence

from pipeline.core.errors import PipelineError
from pipeline.core.names import ALL_FOLDS
from pipeline.data.manifest import Frame, frame_digest
from pipeline.training.run_data import RunData


def _sha1(lines: Iterable[str]) -> str:
    digest = hashlib.sha1()
    for line in lines:
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()


def _frames_digest(frames: Sequence[Frame]) -> str:
    # An older manifest has no digest column: hash the files themselves (slower, same value as
    # prepare's column), never path and size, which miss a mask redrawn in place.
    return _sha1(sorted(f"{f.id} {f.digest or frame_digest(f.image, f.mask)}" for f in frames))


def data_digests(data: RunData, *, teacher: str = "") -> dict[str, str]:
    """Digests (sha1 hex) of what a run learns from, stored in its checkpoints as
    ``config["data"]``: ``train_ids`` / ``val_ids`` (the fold assignment), ``train_frames`` /
    ``val_frames`` (ids with their image and mask contents, the manifest's ``digest``),
    ``classes`` (names, lookup table, ignore index: what maps masks to targets) and
    ``teacher`` (the distillation teacher's
    :func:`pipeline.models.checkpoint.weights_digest`, "" without one)."""
    classes = data.classes
    return {
        "train_ids": _sha1(sorted(f.id for f in data.train_frames)),
        "val_ids": _sha1(sorted(f.id for f in data.val_frames)),
        "train_frames": _frames_digest(data.train_frames),
        "val_frames": _frames_digest(data.val_frames),
        "classes": _sha1([json.dumps({"names": list(classes.names),
                                      "lut": classes.lut_array().tolist(),
                                      "ignore_index": int(classes.ignore_index)})]),
        "teacher": teacher,
    }


# Why a run starts over, by digest; a content change is only named when the ids are the same.
DATA_CHANGES = {"train_ids": "training frames changed (fold assignment)",
                "val_ids": "validation frames changed (fold assignment)",
                "train_frames": "training frames changed (image or mask contents)",
                "val_frames": "validation frames changed (image or mask contents)",
                "classes": "classes changed (names, lookup table or ignore index)",
                "teacher": "teacher weights changed"}


def data_change(saved: dict | None, current: dict) -> str | None:
    """Why a checkpoint with data digests ``saved`` cannot be resumed on ``current``; None when
    it can."""
    if not isinstance(saved, dict):
        return "it records no data digests (saved by an older version)"
    changed = [k for k in DATA_CHANGES if saved.get(k) != current.get(k)]
    for ids, frames in (("train_ids", "train_frames"), ("val_ids", "val_frames")):
        if ids in changed and frames in changed:
            changed.remove(frames)
    return ", ".join(DATA_CHANGES[k] for k in changed) or None


def check_teacher(ckpt: dict, path: Path, *, student: str, fold: int | str,
                  digests: dict) -> None:
    """Refuse a teacher that has seen the student's validation frames: one of another fold, of
    every fold ("all"), or of the same fold number under another fold assignment. A student of
    fold "all" holds nothing out and may learn from any teacher."""
    if fold == ALL_FOLDS:
        return
    key = f"models.{student}.distill.teacher"
    theirs = ckpt.get("fold")
    shown = "an unrecorded fold" if theirs is None else f"fold {theirs}"
    if str(theirs) != str(fold):
        raise PipelineError(f"{key}: teacher {path} was trained with {shown} held out, but the "
                            f"student holds out fold {fold}: the teacher has seen the student's "
                            f"validation frames; use a teacher run of fold {fold}")
    saved = (ckpt.get("config") or {}).get("data") or {}
    if any(k in saved and saved[k] != digests[k] for k in ("train_ids", "val_ids")):
        raise PipelineError(f"{key}: teacher {path} was trained on fold {theirs} of another fold "
                            f"assignment (folds.csv changed since), so it may have seen the "
                            f"student's validation frames; train the teacher of fold {fold} again")
