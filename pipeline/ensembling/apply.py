"""Applying the fitted weights to the test maps: weights.json checked, each member's test map
made as the search recorded it, the fused labels written as ``test_pred/<id>.png``. Nothing is
fitted on test data."""

from __future__ import annotations

import functools
import json
import re
import sys
from pathlib import Path
from typing import Mapping

import numpy as np

from pipeline.core import atomic
from pipeline.core.errors import PipelineError
from pipeline.core.names import ALL_FOLDS, fold_dir_name
from pipeline.data.manifest import Frame, read_classes, read_manifest
from pipeline.ensembling.fusion import GROUPS, Mean, fuse_labels
from pipeline.ensembling.inputs import check_members, meta_digest
from pipeline.ensembling.outputs import WEIGHTS
from pipeline.ensembling.passes import frame_chunks, run_chunks
from pipeline.ensembling.testmaps import member_test, member_test_weights, run_of
from pipeline.inference.members import Member, list_members, member_names

TEST_PRED = "test_pred"


def read_weights(path: Path) -> dict:
    """weights.json of a search, its keys checked: the groups, finite weights >= 0, and each
    member's ``test_weights`` (see :func:`member_test_weights`) when recorded."""
    if not path.is_file():
        raise PipelineError(f"{path}: weights not found (run `python pipeline/ensemble.py "
                            f"--search` first)")
    try:
        weights = json.loads(path.read_text())
        groups = {g: [str(n) for n in weights["groups"].get(g, [])] for g in GROUPS}
        alpha, beta = float(weights["alpha"]), float(weights["beta"])
        members = weights.get("members") or {}
        mixes = {str(n): {str(k): float(v) for k, v in (m.get("test_weights") or {}).items()}
                 for n, m in members.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise PipelineError(f"{path}: corrupt weights file ({type(err).__name__}: {err})") from None
    if not (np.isfinite(alpha) and np.isfinite(beta)):
        raise PipelineError(f"{path}: alpha and beta must be finite numbers >= 0, got "
                            f"alpha={alpha}, beta={beta}")
    listed = [n for g in GROUPS for n in groups[g]]
    if not groups["S"] or alpha < 0 or beta < 0 or len(set(listed)) != len(listed):
        raise PipelineError(f"{path}: needs a non-empty group S, each member in one group only "
                            f"and weights >= 0")
    for name, mix in mixes.items():
        values = list(mix.values())
        folds = [v for k, v in mix.items() if k != fold_dir_name(ALL_FOLDS)]
        if mix and (not all(np.isfinite(v) and v >= 0 for v in values)
                    or not all(re.fullmatch(r"f(0|[1-9]\d*|all)", k) for k in mix)
                    or abs(sum(values) - 1) > 1e-6 or max(folds, default=0) - min(folds, default=0)
                    > 1e-9):
            raise PipelineError(f"{path}: test_weights of member '{name}' must map run folders "
                                f"(f<K>, fall) to finite weights >= 0 that sum to 1, equal "
                                f"across the fold models; got {mix}")
    return {**weights, "groups": groups, "alpha": alpha, "beta": beta}


def _apply_chunk(frames: list[Frame], *, groups: Mapping[str, list[Member]],
                 mixes: Mapping[str, Mapping[int | str, float]], alpha: float,
                 beta: float, num_classes: int, out: Path) -> int:
    from PIL import Image

    for frame in frames:
        want = (num_classes, frame.height, frame.width) if frame.height and frame.width else None
        means = {}
        for group in GROUPS:
            mean = Mean()
            for member in groups[group]:
                probs = member_test(member, frame.id, mixes[member.name])
                want = want or probs.shape
                if probs.shape != want:
                    raise PipelineError(f"{member.root}: test map of frame '{frame.id}' is "
                                        f"{list(probs.shape)} [C, H, W], expected {list(want)}")
                mean.add(probs)
            means[group] = mean.value()
        labels = fuse_labels(means["S"], means["W"], means["A"], alpha=alpha, beta=beta)
        Image.fromarray(labels.astype(np.uint8), mode="L").save(out / f"{frame.id}.png")
    return len(frames)


def apply_ensemble(*, oof_root: Path, data_dir: Path, out_dir: Path, workers: int = 1,
                   chunk_frames: int = 32, progress: bool = True) -> dict:
    """Fuse the test maps (each member's per :func:`member_test_weights` as weights.json records
    them: by default the mean of its fold models; full resolution) with
    ``out_dir/weights.json`` into ``out_dir/test_pred/<id>.png`` (uint8 train ids, one per
    test frame of the manifest), written as a whole folder. When the search fell back to the
    best single member, weights.json lists it alone in S: its test argmax is written.
    Returns a small summary."""
    weights = read_weights(out_dir / WEIGHTS)
    names = [n for g in GROUPS for n in weights["groups"][g]]
    found = member_names(oof_root)
    for group, listed in weights["groups"].items():
        for name in listed:
            if name not in found:
                raise PipelineError(f"{out_dir / WEIGHTS}: member '{name}' of group {group} is "
                                    f"not in {oof_root}")
    by_name = {m.name: m for m in list_members(oof_root, names)}
    classes_path, manifest = data_dir / "classes.json", data_dir / "manifest.csv"
    classes = read_classes(classes_path)
    if classes.num_classes > 255:
        raise PipelineError(f"{classes_path}: {classes.num_classes} classes do not fit uint8 PNGs")
    groups = {group: [by_name[n] for n in sorted(listed)]
              for group, listed in weights["groups"].items()}
    members = [m for g in GROUPS for m in groups[g]]
    check_members(members, classes.num_classes, classes_path, full_size=True,
                  class_names=classes.names)
    recorded = weights.get("members") if isinstance(weights.get("members"), dict) else {}
    changed = [m.name for m in members
               if (recorded.get(m.name) or {}).get("meta_sha", meta_digest(m)) != meta_digest(m)]
    if changed:
        print(f"warning: {', '.join(changed)} changed since the search (meta.json differs); "
              f"the weights were fitted on older maps", file=sys.stderr)
    mixes = {}
    for member in members:
        mix = (recorded.get(member.name) or {}).get("test_weights") or member_test_weights(member)
        mixes[member.name] = {run_of(k): float(v) for k, v in mix.items()}
        lacking = [f for f in mixes[member.name] if f not in member.meta]
        if lacking:
            raise PipelineError(f"{out_dir / WEIGHTS}: test_weights of member '{member.name}' "
                                f"name run {fold_dir_name(lacking[0])}, which {member.root} "
                                f"lacks")
    frames = sorted(read_manifest(manifest, split="test"), key=lambda f: (f.video, f.frame, f.id))
    if not frames:
        raise PipelineError(f"{manifest}: no test frames to predict")
    for member in members:
        runs = [f for f, w in mixes[member.name].items() if w > 0]
        for fold in runs:
            have = set(member.test_ids(fold))
            missing = [f.id for f in frames if f.id not in have]
            if missing:
                nowhere = not any(missing[0] in member.test_ids(r) for r in runs)
                where = member.root if nowhere else member.run_dir(fold)
                raise PipelineError(f"{where}: no test map of frame '{missing[0]}' "
                                    f"({len(missing)} of {len(frames)} test frames missing)")
    with atomic.atomic_dir(out_dir / TEST_PRED) as tmp:
        fn = functools.partial(_apply_chunk, groups=groups, mixes=mixes, alpha=weights["alpha"],
                               beta=weights["beta"], num_classes=classes.num_classes, out=tmp)
        for _ in run_chunks(fn, frame_chunks(frames, chunk_frames), workers=workers,
                            progress=progress, desc="fuse test"):
            pass
    return {"frames": len(frames), "out": str(out_dir / TEST_PRED), "alpha": weights["alpha"],
            "beta": weights["beta"], "groups": weights["groups"],
            "fallback": weights.get("fallback")}
