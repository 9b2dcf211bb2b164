"""Label records: what the grid pass learned of each frame's fused labels, kept per chunk, so
that rows at weights known only after the grid is scored (the best point) are scored without
reading a map again.

Those rows need label maps, for video consistency. The grid pass can leave per chunk a compact
record of what it found (:class:`FrameLabels`, :func:`save_records`: the ground truth, the
label of every pixel settled on one class, and the candidates' S, W, A values of the others),
from which :func:`labels_at` rebuilds :func:`~pipeline.ensembling.fusion.fuse_labels` at any
grid point bit for bit, and :func:`fused_rows` scores such rows.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Collection, Iterable, Mapping, Sequence

import joblib
import numpy as np
from tqdm import tqdm

from pipeline.ensembling.fusion import FusedRow, Table
from pipeline.evaluation.consistency import VC_WINDOWS, VideoConsistency
from pipeline.evaluation.metrics import IGNORE_INDEX, confusion_matrix


class FrameLabels:
    """What :meth:`~pipeline.ensembling.gridscore.GridScorer.add` learned of one frame's fused
    labels, enough to rebuild :func:`~pipeline.ensembling.fusion.fuse_labels` at any grid point
    without the maps (:func:`labels_at`).

    ``gt``: the frame's ground truth [H, W]; ``labels``: int [H*W], the fused label wherever it
    is the same at every grid point; ``multi``: for the other pixels, grouped by their number
    K of candidate classes, (flat pixel indices int [m], candidate classes int [K, m] in
    ascending order, their S, W, A values float32 [3, K, m]).
    """

    __slots__ = ("gt", "labels", "multi")

    def __init__(self, gt: np.ndarray, labels: np.ndarray,
                 multi: list[tuple[np.ndarray, np.ndarray, np.ndarray]]):
        self.gt, self.labels, self.multi = gt, labels, multi


def _fused_slots(values: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """Slot of the fused argmax among K candidates: ``values`` float32 [3, K, m] (S, W, A)
    -> int [m], by the float32 operations of :func:`~pipeline.ensembling.fusion.fuse` (first
    maximum, like np.argmax)."""
    fused = values[0] + np.float32(alpha) * values[1]
    fused += np.float32(beta) * values[2]
    return fused.argmax(axis=0)


def labels_at(record: FrameLabels, alpha: float, beta: float) -> np.ndarray:
    """:func:`~pipeline.ensembling.fusion.fuse_labels` of the recorded frame at the grid point
    (alpha, beta): [H, W]."""
    labels = record.labels.copy()
    for px, cand, values in record.multi:
        labels[px] = cand[_fused_slots(values, alpha, beta), np.arange(px.size)]
    return labels.reshape(record.gt.shape)


def save_records(path: Path, records: Sequence[FrameLabels], *, new_video: Sequence[bool]) -> None:
    """The :class:`FrameLabels` of one chunk's frames (in order; ``new_video``: frame i starts
    a video) as one uncompressed npz: frames concatenated pixel after pixel, multi-candidate
    pixels grouped by K over the whole chunk."""
    offsets = np.cumsum([0] + [r.labels.size for r in records])
    index = np.int32 if offsets[-1] < 2**31 else np.int64
    by_k: dict[int, list] = {}
    for offset, record in zip(offsets, records):
        for px, cand, values in record.multi:
            by_k.setdefault(cand.shape[0], []).append((px.astype(index) + index(offset), cand,
                                                       values))
    arrays = {"shapes": np.array([r.gt.shape for r in records], np.int64).reshape(-1, 2),
              "new_video": np.asarray(new_video, bool),
              "gt": np.concatenate([r.gt.reshape(-1) for r in records]),
              "labels": np.concatenate([r.labels for r in records])}
    for k, parts in by_k.items():
        arrays[f"index{k}"] = np.concatenate([p[0] for p in parts])
        arrays[f"cand{k}"] = np.concatenate([p[1] for p in parts], axis=1)
        arrays[f"values{k}"] = np.concatenate([p[2] for p in parts], axis=2)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def load_records(path: Path) -> tuple[FrameLabels, np.ndarray, np.ndarray]:
    """(the chunk's frames as one :class:`FrameLabels` of flat [N] pixels, shapes int [F, 2],
    new_video bool [F]) of :func:`save_records`."""
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    ks = sorted(int(name[5:]) for name in arrays if name.startswith("index"))
    multi = [(arrays[f"index{k}"], arrays[f"cand{k}"], arrays[f"values{k}"]) for k in ks]
    return FrameLabels(arrays["gt"], arrays["labels"], multi), arrays["shapes"], arrays["new_video"]


def _rows_chunk(path: Path, *, rows: Mapping[str, FusedRow], num_classes: int,
                ignore_index: int, windows: Sequence[int]) -> Table:
    """Confusion matrix and video consistency of each fused row on one chunk's records."""
    record, shapes, new_video = load_records(path)
    bounds = np.cumsum([0] + [int(h) * int(w) for h, w in shapes])
    table = {}
    for key, row in rows.items():
        labels = labels_at(record, row.alpha, row.beta)
        cm = confusion_matrix(record.gt, labels, num_classes=num_classes,
                              ignore_index=ignore_index)
        vc = VideoConsistency(windows=windows)
        for i, shape in enumerate(shapes):
            if i and new_video[i]:
                vc.end_video()
            vc.add_frame(record.gt[bounds[i]:bounds[i + 1]].reshape(shape),
                         labels[bounds[i]:bounds[i + 1]].reshape(shape))
        table[key] = (cm, vc)
    return table


def fused_rows_tasks(record_dir: Path, *, rows: Mapping[str, FusedRow], num_classes: int,
                     ignore_index: int = IGNORE_INDEX,
                     windows: Sequence[int] = VC_WINDOWS) -> list:
    """joblib-delayed calls, one per chunk of label records in ``record_dir``, whose results
    :func:`merge_rows` adds up (run them with other tasks on the same workers)."""
    fn = functools.partial(_rows_chunk, rows=dict(rows), num_classes=num_classes,
                           ignore_index=ignore_index, windows=tuple(windows))
    return [joblib.delayed(fn)(path) for path in sorted(Path(record_dir).glob("chunk*.npz"))]


def merge_rows(tables: Iterable[Table], *, rows: Collection[str], num_classes: int,
               windows: Sequence[int] = VC_WINDOWS) -> dict[str, tuple[np.ndarray, dict]]:
    """The chunks' results (in chunk order) of :func:`fused_rows_tasks` summed up: {key:
    (confusion matrix int64 [C, C], {n: mVC_n})}."""
    cms = {key: np.zeros((num_classes, num_classes), np.int64) for key in rows}
    vcs = {key: VideoConsistency(windows=windows) for key in rows}
    for table in tables:
        for key, (cm, vc) in table.items():
            cms[key] += cm
            vcs[key].merge(vc)
    return {key: (cms[key], vcs[key].result()) for key in rows}


def fused_rows(record_dir: Path, *, rows: Mapping[str, FusedRow], num_classes: int,
               ignore_index: int = IGNORE_INDEX, windows: Sequence[int] = VC_WINDOWS,
               workers: int = 1, progress: bool = True,
               desc: str = "fused rows") -> dict[str, tuple[np.ndarray, dict[int, float]]]:
    """Rows predicting :func:`~pipeline.ensembling.fusion.fuse_labels` at grid points, scored
    from the label records a :func:`~pipeline.ensembling.passes.score_pass` with ``record_dir``
    left there (no map is read): {key: (confusion matrix int64 [C, C], {n: mVC_n})}, as the
    same rows of that pass would give."""
    tasks = fused_rows_tasks(record_dir, rows=rows, num_classes=num_classes,
                             ignore_index=ignore_index, windows=windows)
    results = joblib.Parallel(n_jobs=workers, return_as="generator")(tasks)
    return merge_rows(tqdm(results, total=len(tasks), desc=desc, unit="chunk",
                           disable=not progress), rows=rows, num_classes=num_classes,
                      windows=windows)
