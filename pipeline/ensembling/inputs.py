"""The members a search fits and the frames it fits them on: the members the params define,
the labelled frames whose OOF maps they all hold, and the checks their maps pass (classes,
strides, coverage of the train frames, or of those ``infer.oof_sample`` samples, the confusion
matrices inference stored)."""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.names import MAP_META_FILE
from pipeline.data.manifest import ClassInfo, Frame, read_classes, read_manifest
from pipeline.data.oof_sample import SECTION, OOFSample, as_clips, sample_clips
from pipeline.data.splits import read_folds
from pipeline.inference.members import Member, list_members, member_names


def select_members(oof_root: Path, wanted: Sequence[str] | None, *,
                   source: str = "params.yaml") -> tuple[list[Member], list[str]]:
    """(the members ``wanted`` (all found: None), the names of the other members found under
    ``oof_root``, which are ignored). A wanted member without maps is an error naming it."""
    found = member_names(oof_root)
    if wanted is None:
        return list_members(oof_root), []
    missing = [name for name in wanted if name not in found]
    if missing:
        more = f" (also missing: {', '.join(missing[1:])})" if missing[1:] else ""
        raise PipelineError(f"{oof_root / missing[0]}: no maps of member '{missing[0]}', which "
                            f"{source} defines (train.models x train.seeds, train.students x "
                            f"train.student_seeds){more}; run its inference or drop it there")
    return list_members(oof_root, wanted), [name for name in found if name not in wanted]


def oof_frames(members: Sequence[Member], frames: Sequence[Frame], manifest: Path) -> list[Frame]:
    """The labelled frames every member has an OOF map of, sorted by (video, frame, id)."""
    have = {m.name: set(m.oof_ids()) for m in members}
    union = set().union(*have.values())
    for member in members:
        missing = sorted(union - have[member.name])
        if missing:
            raise PipelineError(f"{member.root}: no out-of-fold map of frame '{missing[0]}' "
                                f"({len(missing)} of the {len(union)} frames other members "
                                f"cover); every member must cover the same frames")
    by_id = {f.id: f for f in frames}
    for frame_id in sorted(union):
        if frame_id not in by_id or not by_id[frame_id].mask:
            state = "is not in" if frame_id not in by_id else "has no mask in"
            raise PipelineError(f"{manifest}: out-of-fold frame '{frame_id}' {state} the manifest")
    return sorted((by_id[i] for i in union), key=lambda f: (f.video, f.frame, f.id))


def check_oof_coverage(frames: Sequence[Frame], train_ids: Mapping[str, int | None], *,
                       where: Path, allow_partial: bool,
                       sample: OOFSample | None = None) -> dict[str, Any]:
    """How the OOF ``frames`` cover the train frames ``train_ids`` ({id: fold}, the folds file's;
    fold None when only the manifest is known, ``where``): {"oof_frames", "oof_frames_missing",
    "partial", "missing_folds": {fold: frames missing}}. A fit on part of the train frames (a
    fold not trained or not inferred yet) is refused unless ``allow_partial``. With a
    ``sample`` (not full), ``train_ids`` are the sampled ones and the info says so
    ("oof_sampled", "oof_sample": its settings)."""
    sampled = sample is not None and not sample.full
    covered = {f.id for f in frames}
    extra = sorted(covered - set(train_ids))
    if extra:
        which = f"sampled train frames ({SECTION})" if sampled else "train frames"
        raise PipelineError(f"{where}: out-of-fold frame '{extra[0]}' is not one of its {which} "
                            f"({len(extra)} such); the maps were made with another split"
                            f"{' or sample' if sampled else ''}")
    missing = sorted(set(train_ids) - covered)
    per_fold = collections.Counter(train_ids[i] for i in missing)
    totals = collections.Counter(train_ids.values())
    info = {"oof_frames": len(covered), "oof_frames_missing": len(missing),
            "partial": bool(missing),
            "missing_folds": {str(k): per_fold[k] for k in sorted(per_fold, key=str)
                              if k is not None},
            "oof_sampled": sampled, "oof_sample": sample.describe() if sampled else None}
    if missing and not allow_partial:
        folds = "; ".join(f"fold {k}: {per_fold[k]} of its {totals[k]}"
                          for k in sorted(per_fold, key=str) if k is not None)
        raise PipelineError(f"{where}: the members' out-of-fold maps cover {len(covered)} of its "
                            f"{len(train_ids)} {'sampled ' if sampled else ''}train frames, "
                            f"{len(missing)} missing "
                            f"({folds or f'first {missing[0]!r}'}); run the missing folds' "
                            f"training and inference, or set ensemble.allow_partial: true to "
                            f"fit on the covered frames only")
    return info


def check_members(members: Sequence[Member], num_classes: int, classes_path: Path, *,
                  full_size: bool, class_names: Sequence[str] | None = None) -> int:
    """Class counts (and, given ``class_names``, the names each run's meta.json records, in
    order) agree with classes.json; returns the common stride (1 with full_size)."""
    for member in members:
        if member.classes != num_classes:
            raise PipelineError(f"{member.root}: maps of {member.classes} classes, {classes_path} "
                                f"has {num_classes}")
        for fold in member.folds if class_names is not None else ():
            meta = member.run_dir(fold) / MAP_META_FILE
            names = member.meta[fold].get("class_names")
            if not isinstance(names, list):
                raise PipelineError(f"{meta}: no class_names to check against {classes_path} "
                                    f"(maps made before inference recorded them); re-run the "
                                    f"inference of member '{member.name}'")
            if [str(n) for n in names] != [str(n) for n in class_names]:
                k = next(i for i, (a, b) in enumerate(itertools.zip_longest(
                    map(str, names), map(str, class_names))) if a != b)
                raise PipelineError(f"{meta}: member '{member.name}' was predicted with class "
                                    f"{k} = '{names[k]}' but {classes_path} has '{class_names[k]}' "
                                    f"(classes reordered or renamed); re-run its inference")
    strides = {m.stride for m in members}
    if len(strides) > 1 and not full_size:
        listed = ", ".join(f"{m.name}={m.stride}" for m in members)
        raise PipelineError(f"members were stored at different strides ({listed}); set "
                            f"ensemble.full_size: true to score them at full resolution")
    return 1 if full_size else strides.pop()


def meta_confusions(members: Sequence[Member], num_classes: int) -> dict[str, np.ndarray] | None:
    """Each member's OOF confusion matrix summed over its runs' meta.json ("oof_cm_tta", which
    inference stores with the maps), or None when a run with OOF maps lacks a valid one."""
    out = {}
    for member in members:
        total = np.zeros((num_classes, num_classes), np.int64)
        for fold in {member.oof_fold(i) for i in member.oof_ids()}:
            try:
                cm = np.asarray(member.meta[fold].get("oof_cm_tta"), dtype=np.int64)
            except (TypeError, ValueError):
                return None
            if cm.shape != total.shape:
                return None
            total += cm
        out[member.name] = total
    return out


def check_meta_confusions(member_cms: Mapping[str, np.ndarray], *, gt_counts: np.ndarray,
                          scored: Mapping[str, np.ndarray], roots: Mapping[str, Path]) -> None:
    """The members' stored OOF confusion matrices (meta.json "oof_cm_tta") against the maps:
    every one must count the ground truth the pass counted (``gt_counts`` int [C], its row
    sums), and those the pass ``scored`` ({name: cm}) must equal them."""
    for name, cm in member_cms.items():
        if not np.array_equal(cm.sum(axis=1), gt_counts) or (
                name in scored and not np.array_equal(cm, scored[name])):
            raise PipelineError(f"{roots[name]}: the confusion matrix in its meta.json "
                                f"(oof_cm_tta) disagrees with its OOF maps; re-run its inference")


def meta_digest(member: Member) -> str:
    """Short sha256 of the member's runs' meta.json: what the search fitted on, recorded so a
    later change of the maps is noticed."""
    text = json.dumps({str(f): member.meta[f] for f in member.folds}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class SearchInputs:
    """What :func:`read_inputs` read and checked: the ``members`` (sorted by name) and the
    ``ignored`` names of other members found, classes.json (``classes``, ``classes_path``),
    the manifest, the members' common ``stride``, the OOF ``frames`` (sorted by video, frame,
    id) and their ``coverage`` of the train frames (:func:`check_oof_coverage`). With a
    sample that cuts videos into windows, each frame's ``video`` names its clip (a run of
    consecutive frames, :func:`pipeline.data.oof_sample.as_clips`), so video consistency never
    pairs two frames across a gap of the sample."""

    members: list[Member]
    ignored: list[str]
    classes: ClassInfo
    classes_path: Path
    manifest: Path
    stride: int
    frames: list[Frame]
    coverage: dict[str, Any]

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]


def read_inputs(oof_root: Path, data_dir: Path, *, members: Sequence[str] | None,
                folds_path: Path | None, full_size: bool, allow_partial: bool,
                source: str, oof_sample: OOFSample | None = None) -> SearchInputs:
    """The members under ``oof_root`` (``members``: the names to use, None: all found; the
    others found are ignored, said in one line), checked against ``data_dir``'s classes.json,
    and the OOF frames of its manifest.csv, which must cover the train frames of
    ``folds_path`` (None: the manifest's), those ``oof_sample`` samples of them (None: all),
    unless ``allow_partial``."""
    chosen, ignored = select_members(oof_root, members, source=source)
    if ignored:
        print(f"{oof_root}: ignoring the maps of {', '.join(ignored)} (not a member "
              f"{source} defines)")
    classes_path, manifest = data_dir / "classes.json", data_dir / "manifest.csv"
    classes = read_classes(classes_path)
    stride = check_members(chosen, classes.num_classes, classes_path, full_size=full_size,
                           class_names=classes.names)
    all_frames = read_manifest(manifest)
    frames = oof_frames(chosen, all_frames, manifest)
    if folds_path is not None:
        train_ids, where = dict(read_folds(folds_path)), Path(folds_path)
    else:
        where = manifest
        train_ids = {f.id: None for f in all_frames if f.split == "train" and f.mask}
    sample = oof_sample or OOFSample()
    if not sample.full:
        clips = sample_clips((f for f in all_frames if f.split == "train"), sample)
        keep = {f.id for clip in clips.values() for f in clip}
        train_ids = {i: k for i, k in train_ids.items() if i in keep}
    coverage = check_oof_coverage(frames, train_ids, where=where, allow_partial=allow_partial,
                                  sample=sample)
    if not sample.full:
        frames = as_clips(frames, clips)
    return SearchInputs(members=chosen, ignored=ignored, classes=classes,
                        classes_path=classes_path, manifest=manifest, stride=stride,
                        frames=frames, coverage=coverage)
