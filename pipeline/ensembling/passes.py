"""Streaming passes over the OOF maps: :func:`score_pass` reads each frame's ground truth and
its members' maps (:class:`OofSource`) once, video by video in joblib chunks, feeding the grid
scorer (:mod:`pipeline.ensembling.gridscore`) and any number of table rows (a member, a mean of
members, a fused map at fixed weights: confusion matrix and video consistency each). With a
folder for them, the grid pass leaves the label records of :mod:`pipeline.ensembling.records`.

The chunking helpers also serve the passes over test maps (apply, holdout).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Iterator, Mapping, Sequence

import joblib
import numpy as np
from tqdm import tqdm

from pipeline.core.errors import PipelineError
from pipeline.data.manifest import Frame, read_mask
from pipeline.ensembling.fusion import GROUPS, FusedRow, Mean, MeanRow, Table, fuse_labels
from pipeline.ensembling.gridscore import GridCounts, GridScorer
from pipeline.ensembling.records import FrameLabels, save_records
from pipeline.evaluation.consistency import VC_WINDOWS, VideoConsistency
from pipeline.evaluation.metrics import IGNORE_INDEX, ConfusionMatrix
from pipeline.inference.members import Member


@dataclass(frozen=True)
class OofSource:
    """How a pass reads a training frame: its ground truth at the maps' resolution, then the
    out-of-fold map of each member in turn (one map in memory at a time).

    ``members`` are sorted by name: every mean sums their maps in that order. ``lut``: raw mask
    value -> train id. ``full_size``: upsample strided maps to the mask's size; otherwise the
    mask is subsampled by the members' common ``stride`` (scores on the stored grid).
    """

    members: tuple[Member, ...]
    lut: np.ndarray
    num_classes: int
    stride: int = 1
    full_size: bool = False
    ignore_index: int = IGNORE_INDEX

    def gt(self, frame: Frame) -> np.ndarray:
        mask = read_mask(frame.mask, self.lut)
        return mask if self.full_size or self.stride == 1 else mask[::self.stride, ::self.stride]

    def maps(self, frame: Frame, shape: tuple[int, int],
             names: Collection[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """(member name, float32 [C, H, W] map) for the members in ``names`` (all: None)."""
        want = (self.num_classes, *shape)
        for member in self.members:
            if names is not None and member.name not in names:
                continue
            probs = member.read_oof(frame.id, full_size=self.full_size)
            if probs.shape != want:
                scale = "" if self.full_size or self.stride == 1 else f" at stride {self.stride}"
                raise PipelineError(
                    f"{member.root}: out-of-fold map of frame '{frame.id}' is {list(probs.shape)} "
                    f"[C, H, W] but {self.num_classes} classes and the mask{scale} need "
                    f"{list(want)}")
            yield member.name, probs


def _labels(probs: np.ndarray) -> np.ndarray:
    return probs.argmax(axis=0).astype(np.uint8 if probs.shape[0] <= 255 else np.uint16)


def frame_chunks(frames: Sequence[Frame], size: int) -> list[list[Frame]]:
    """Consecutive runs of ``size`` frames."""
    return [list(frames[i:i + size]) for i in range(0, len(frames), max(1, size))]


def video_chunks(frames: Sequence[Frame], size: int) -> list[list[Frame]]:
    """Whole videos (``frames`` sorted by video and frame) packed into runs of >= ``size``."""
    chunks: list[list[Frame]] = []
    for _, video in itertools.groupby(frames, key=lambda f: f.video):
        if not chunks or len(chunks[-1]) >= size:
            chunks.append([])
        chunks[-1].extend(video)
    return chunks


def run_chunks(fn: Callable, chunks: list[list[Frame]], *, workers: int, progress: bool,
               desc: str) -> Iterator:
    """``fn(chunk)`` for every chunk on ``workers`` joblib processes, results in order."""
    results = joblib.Parallel(n_jobs=workers, return_as="generator")(
        joblib.delayed(fn)(chunk) for chunk in chunks)
    with tqdm(total=sum(map(len, chunks)), desc=desc, unit="frame", disable=not progress) as bar:
        for chunk, result in zip(chunks, results):
            bar.update(len(chunk))
            yield result


def _pass_chunk(frames: list[Frame], *, source: OofSource, groups: Mapping[str, Sequence[str]],
                rows: Mapping[str, MeanRow | FusedRow], windows: Sequence[int],
                grid: tuple[list[float], list[float]] | None,
                records: Mapping[str, Path] | None = None) -> tuple[GridCounts | None, Table]:
    """One chunk of whole videos, in order: grid counts (when ``grid``) and each row's
    confusion matrix and video consistency. Each member's map is read once per frame.
    ``records``: {first frame id: path} where the chunk's :class:`FrameLabels` are saved."""
    c = source.num_classes
    group_of = {name: group for group, names in groups.items() for name in names}
    needs_groups = grid is not None or any(isinstance(r, FusedRow) for r in rows.values())
    needed = {n for row in rows.values() if isinstance(row, MeanRow) for n in row.members}
    needed |= set(group_of) if needs_groups else set()
    scorer = GridScorer(*grid, c, ignore_index=source.ignore_index,
                        record=records is not None) if grid else None
    cms = {key: ConfusionMatrix(num_classes=c, ignore_index=source.ignore_index) for key in rows}
    vcs = {key: VideoConsistency(windows=windows) for key in rows}
    kept: list[FrameLabels] = []
    for i, frame in enumerate(frames):
        if i and frame.video != frames[i - 1].video:
            for vc in vcs.values():
                vc.end_video()
        gt = source.gt(frame)
        means = {group: Mean() for group in GROUPS}
        row_means = {key: Mean() for key, row in rows.items() if isinstance(row, MeanRow)}
        own = {}  # the mean of one map is that map (x / 1 == x): no copy
        for name, probs in source.maps(frame, gt.shape, needed):
            if name in group_of:
                means[group_of[name]].add(probs)
            for key, mean in row_means.items():
                if rows[key].members == (name,):
                    own[key] = probs
                elif name in rows[key].members:
                    mean.add(probs)
        if scorer is not None:
            record = scorer.add(*(means[g].value() for g in GROUPS), gt)
            if record is not None:
                kept.append(record)
        for key, row in rows.items():
            if isinstance(row, MeanRow):
                pred = _labels(own[key] if key in own else row_means[key].value())
            else:
                pred = fuse_labels(*(means[g].value() for g in GROUPS), alpha=row.alpha,
                                   beta=row.beta)
            cms[key].update(gt, pred)
            vcs[key].add_frame(gt, pred)
    if kept:
        save_records(records[frames[0].id], kept, new_video=[
            i == 0 or f.video != frames[i - 1].video for i, f in enumerate(frames)])
    return (scorer.counts if scorer else None), {key: (cms[key].matrix, vcs[key]) for key in rows}


def score_pass(source: OofSource, frames: Sequence[Frame], *,
               rows: Mapping[str, MeanRow | FusedRow],
               groups: Mapping[str, Sequence[str]] | None = None,
               grid: tuple[Sequence[float], Sequence[float]] | None = None,
               record_dir: Path | None = None, windows: Sequence[int] = VC_WINDOWS,
               workers: int = 1, chunk_frames: int = 32, progress: bool = True,
               desc: str = "OOF pass") -> tuple[GridCounts | None, dict]:
    """One read pass over ``frames`` (sorted by video and frame; whole videos per task).

    ``groups``: {"S"|"W"|"A": member names}; ``grid``: (alphas, betas) to score
    P_S + a P_W + b P_A at every grid point (:class:`GridCounts`, else None); ``rows``: named
    :class:`MeanRow` / :class:`FusedRow` predictions, each returned as (confusion matrix int64
    [C, C], {n: mVC_n} for ``windows``, nan where no video is longer than n frames).
    ``record_dir`` (with ``grid``): an existing folder where each chunk saves the
    :class:`FrameLabels` of its frames (``chunk<i>.npz``) for
    :func:`~pipeline.ensembling.records.fused_rows`.
    Chunks of about ``chunk_frames`` frames run on ``workers`` joblib processes; each holds one
    frame's maps at a time and returns its partial counts, which are summed here.
    """
    groups = {g: list((groups or {}).get(g, [])) for g in GROUPS}
    grid = (list(grid[0]), list(grid[1])) if grid is not None else None
    if (grid or any(isinstance(r, FusedRow) for r in rows.values())) and not groups["S"]:
        raise ValueError("fusion needs a non-empty group S")
    if record_dir is not None and grid is None:
        raise ValueError("label records come from the grid: give a grid with record_dir")
    chunks = video_chunks(frames, chunk_frames)
    records = None if record_dir is None else {
        chunk[0].id: Path(record_dir) / f"chunk{i:06d}.npz" for i, chunk in enumerate(chunks)}
    fn = functools.partial(_pass_chunk, source=source, groups=groups, rows=dict(rows),
                           windows=tuple(windows), grid=grid, records=records)
    c = source.num_classes
    counts = GridCounts.zeros(*grid, c) if grid else None
    cms = {key: np.zeros((c, c), np.int64) for key in rows}
    vcs = {key: VideoConsistency(windows=windows) for key in rows}
    for part, table in run_chunks(fn, chunks, workers=workers, progress=progress, desc=desc):
        if counts is not None:
            counts.add(part)
        for key, (cm, vc) in table.items():
            cms[key] += cm
            vcs[key].merge(vc)
    return counts, {key: (cms[key], vcs[key].result()) for key in rows}
